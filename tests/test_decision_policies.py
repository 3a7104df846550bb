"""Policies that decide from what they observe: AutoFreeze, SmartFRZ, CKA and Egeria.

Decision rules on constructed histories with known answers, the properties of CKA and of the attention predictor,
the shipped predictor, composition with discard, the freeze timeline, and resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from transformers import TrainingArguments, set_seed

from hf_freezecache import FreezeCacheArguments, FreezeCacheTrainer
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter
from hf_freezecache.policies import (
    AutoFreezeConfig,
    BlockProbe,
    CKAConfig,
    EgeriaConfig,
    FreezePolicy,
    PolicyConfig,
    SmartFRZConfig,
    TrainingProgress,
    build_policy,
    linear_cka,
    register_policy,
)
from hf_freezecache.policies._reference import ReferenceRepresentations
from hf_freezecache.policies._schedule import EvaluationClock, decode_array, encode_array, relative_slope, stabilised
from hf_freezecache.policies.egeria import Egeria
from hf_freezecache.policies.smartfrz import DEFAULT_PREDICTOR, FreezePredictor, WeightTailor
from hf_freezecache.policies.smartfrz.corpus import RunHistory
from hf_freezecache.policies.smartfrz.fitting import HistoryWindows, PredictorRecipe
from hf_freezecache.policies.smartfrz.predictor import CONTEXT_FEATURES, WEIGHT_FEATURES, record_features
from hf_freezecache.policies.smartfrz.recording import label_freeze_points

SAMPLES = 128
BATCH = 32  # 4 steps per epoch


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, max_eval_samples=32, augment=False)


def _adapter(seed=0):
    torch.manual_seed(seed)
    return get_block_adapter(CifarResNet.from_name("resnet20"))  # 9 blocks


def _policy(config, adapter=None):
    policy = build_policy(config)
    policy.setup(adapter or _adapter())
    return policy


def _progress(step, steps_per_epoch=4, epochs=10):
    return TrainingProgress(step, steps_per_epoch * epochs, step / steps_per_epoch, float(epochs))


def _set_block_gradient_norms(adapter, norms):
    """Gives every parameter of block i a constant gradient so that the block's gradient norm is norms[i]."""
    for index, norm in enumerate(norms):
        params = adapter.block_parameters(index)
        total = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.full_like(p, norm / math.sqrt(total))


# -- shared pieces -----------------------------------------------------------------------------------------------


def test_evaluation_clock_fires_per_epoch_fraction_once():
    clock = EvaluationClock(4)
    fired = [step for step in range(1, 13) if clock.due(_progress(step, steps_per_epoch=6))]
    assert fired == [2, 3, 5, 6, 8, 9, 11, 12]  # every 1.5 steps: the first step at or after each quarter epoch


def test_stabilised_and_relative_slope_on_constructed_series():
    assert not stabilised([0.5, 0.6], window=3, tolerance=1.0)  # too short
    assert stabilised([0.1, 0.50, 0.509, 0.505], window=3, tolerance=0.01)
    assert not stabilised([0.1, 0.50, 0.52, 0.505], window=3, tolerance=0.01)
    assert relative_slope([4.0, 3.0, 2.0]) == pytest.approx(-1.0 / 3.0)
    assert relative_slope([2.0, 2.0, 2.0]) == pytest.approx(0.0)


def test_arrays_survive_json_exactly():
    array = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    restored = decode_array(json.loads(json.dumps(encode_array(array))))
    assert restored.dtype == array.dtype and np.array_equal(restored, array)


# -- CKA ---------------------------------------------------------------------------------------------------------


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-10)  # centered: a shift changes nothing
    y = torch.randn(64, 30, generator=gen)
    # The feature-space formula ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centered features.
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    direct = torch.linalg.matrix_norm(yc.T @ xc) ** 2 / (
        torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    )
    assert linear_cka(x, y) == pytest.approx(float(direct), rel=1e-9)
    assert linear_cka(x, y) < 0.9
    stretched = x * torch.linspace(0.1, 3.0, 40)  # anisotropic scaling is not an invariance
    assert linear_cka(x, stretched) < 0.99


def test_labels_start_where_the_cka_settles_for_good():
    # Block 0 rises by 0.5 and settles; block 1 plateaus within 0.02 early, then moves again; block 2 never moves
    # by more than 0.001 but keeps moving (a band relative to its own range: only the end counts as settled).
    cka = np.array(
        [
            [0.20, 0.90, 0.5000],
            [0.50, 0.91, 0.5010],
            [0.69, 0.90, 0.5000],
            [0.70, 0.60, 0.5010],
            [0.71, 0.80, 0.5000],
            [0.70, 0.80, 0.5005],
        ]
    )
    labels = label_freeze_points(cka, tolerance=0.1)  # bands: 0.051, 0.031, 0.0001
    assert labels[:, 0].tolist() == [0, 0, 1, 1, 1, 1]
    assert labels[:, 1].tolist() == [0, 0, 0, 0, 1, 1]  # the early plateau was not the end of it
    assert labels[:, 2].tolist() == [0, 0, 0, 0, 0, 1]
    assert label_freeze_points(cka, tolerance=1.0).min() == 1  # the whole range allowed: settled from the start


def test_block_probe_reuses_the_frozen_prefix_and_equals_the_model(cifar_batch):
    adapter = _adapter()
    adapter.model.eval()
    probe = BlockProbe(adapter, cifar_batch["pixel_values"])
    full = probe.run()
    with torch.no_grad():
        torch.testing.assert_close(full[8][1], adapter.prefix(cifar_batch["pixel_values"], 9), rtol=0, atol=0)
    calls = []
    adapter.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    late = probe.run(4)
    late_again = probe.run(4)
    assert len(calls) == 1  # block 0 ran once, to move the cached prefix from position 0 to 4
    assert set(late) == set(range(4, 9))
    torch.testing.assert_close(late_again[8][1], full[8][1], rtol=0, atol=0)


def test_cka_policy_freezes_blocks_whose_similarity_stopped_moving_in_any_order(tmp_path, cifar_batch):
    adapter = _adapter(seed=0)
    reference = CifarResNet.from_name("resnet20")
    torch.save(reference.state_dict(), tmp_path / "reference.bin")
    policy = _policy(CKAConfig(reference=str(tmp_path / "reference.bin"), window=3), adapter)
    policy.set_probe(BlockProbe(adapter, cifar_batch["pixel_values"]))
    # The model does not train: every CKA value repeats, so each block is stable once it has 3 values.
    decisions = [policy.blocks_to_freeze(_progress(step), frozenset({4})) for step in range(1, 4)]
    assert decisions[:2] == [set(), set()]
    assert decisions[2] == set(range(9)) - {4}  # out of order: block 4 is frozen, blocks after it still decide
    assert 4 not in policy.evidence and policy.evidence[5]["cka_range"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(FileNotFoundError, match="--cka_reference"):
        _policy(CKAConfig(reference=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="needs --cka_reference"):
        FreezeCacheArguments(freeze_policy="cka")


def test_cka_reference_must_match_the_model(tmp_path, cifar_batch):
    torch.save(CifarResNet.from_name("resnet32").state_dict(), tmp_path / "other.bin")
    policy = _policy(CKAConfig(reference=str(tmp_path / "other.bin")))
    with pytest.raises(ValueError, match="does not match the model being trained"):
        policy.set_probe(BlockProbe(policy.adapter, cifar_batch["pixel_values"]))


# -- AutoFreeze --------------------------------------------------------------------------------------------------


def test_autofreeze_percentile_and_sequential_constraint():
    adapter = _adapter()
    policy = _policy(AutoFreezeConfig(evaluations_per_epoch=4), adapter)
    _set_block_gradient_norms(adapter, [1.0] * 9)
    policy.observe_gradients(_progress(1))
    assert policy.blocks_to_freeze(_progress(1), frozenset()) == set()  # first evaluation: g_prev only
    # Rates |g_prev - g| / g_prev: block 1 changes a lot; blocks 0, 2, 3 barely; the median of the 9 rates is 0.2.
    rates = [0.01, 0.5, 0.0, 0.02, 0.1, 0.3, 0.4, 0.2, 0.6]
    _set_block_gradient_norms(adapter, [1.0 - r for r in rates])
    policy.observe_gradients(_progress(2))
    assert policy.blocks_to_freeze(_progress(2), frozenset()) == {0}  # 2 and 3 are candidates, but 1 is not frozen
    assert policy.evidence[2]["change_rate"] == pytest.approx(0.0, abs=1e-6)
    assert policy.evidence[0]["threshold"] == pytest.approx(0.2, rel=1e-4)  # float32 norms
    # Next interval, with block 0 frozen: the front block 1 is now among the slowest: 1, 2 and 3 freeze together.
    previous = [1.0 - r for r in rates]
    changes = {1: 0.0, 2: 0.001, 3: 0.002, 4: 0.5, 5: 0.4, 6: 0.3, 7: 0.01, 8: 0.6}
    _set_block_gradient_norms(adapter, [1.0] + [previous[i] * (1 - changes[i]) for i in range(1, 9)])
    policy.observe_gradients(_progress(3))
    assert policy.blocks_to_freeze(_progress(3), frozenset({0})) == {1, 2, 3}  # 7 is slow too, but 4 is not


def test_autofreeze_averages_the_gradient_norm_over_the_interval():
    adapter = _adapter()
    policy = _policy(AutoFreezeConfig(evaluations_per_epoch=1), adapter)
    for step, norm in ((1, 1.0), (2, 3.0), (3, 2.0)):
        _set_block_gradient_norms(adapter, [norm] * 9)
        policy.observe_gradients(_progress(step))
        assert policy.blocks_to_freeze(_progress(step), frozenset()) == set()
    _set_block_gradient_norms(adapter, [4.0] * 9)
    policy.observe_gradients(_progress(4))
    policy.blocks_to_freeze(_progress(4), frozenset())
    assert policy.previous_norms[0] == pytest.approx(2.5, rel=1e-5)  # (1 + 3 + 2 + 4) / 4 steps of epoch 1


# -- Egeria ------------------------------------------------------------------------------------------------------


def test_egeria_rule_freezes_front_blocks_that_stopped_improving():
    rule = Egeria.front_blocks_to_freeze
    assert rule({0: -0.001, 1: 0.01, 2: -0.5, 3: 0.0}, start=0, threshold=0.02) == {0, 1}
    assert rule({0: -0.3, 1: 0.0}, start=0, threshold=0.02) == set()  # block 0 still improving: nothing behind it
    assert rule({3: 0.0, 4: -0.019}, start=3, threshold=0.02) == {3, 4}
    assert rule({1: 0.0}, start=0, threshold=0.02) == set()  # block 0 has no slope yet


def test_egeria_measures_plasticity_against_a_bf16_reference(cifar_batch):
    adapter = _adapter()
    policy = _policy(EgeriaConfig(window=3), adapter)
    policy.set_probe(BlockProbe(adapter, cifar_batch["pixel_values"]))
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in policy.reference[0])
    with torch.no_grad():  # one "training step" that moves block 2 only
        for p in adapter.block_parameters(2):
            p.mul_(1.5)
    policy.blocks_to_freeze(_progress(1), frozenset())
    plasticity = {i: policy.evidence[i]["plasticity"] for i in range(9)}
    assert plasticity[2] > 0.1
    assert max(plasticity[i] for i in range(9) if i != 2) < 0.02  # the bf16 copy's rounding only
    # A model that stops changing: plasticity settles at the rounding floor and the front blocks freeze.
    decided = [policy.blocks_to_freeze(_progress(step), frozenset()) for step in range(2, 5)]
    assert decided[-1] and min(decided[-1]) == 0 and decided[-1] == set(range(len(decided[-1])))


# -- SmartFRZ ----------------------------------------------------------------------------------------------------


def test_predictor_attends_over_real_steps_only_and_ignores_padding():
    torch.manual_seed(0)
    predictor = FreezePredictor(input_size=16, hidden_size=8, key_size=4, classifier_hidden_size=4).eval()
    records = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # a shorter window, padded at the front
    context = torch.rand(2, 6, 2)
    logits, attention = predictor(records, mask, context)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2))
    assert torch.all(attention[0, :1] == 0) and torch.all(attention[1, :3] == 0)  # padding and step-less firsts
    padded, padded_context = records.clone(), context.clone()
    padded[1, :2], padded_context[1, :2] = 100.0, 5.0  # padding content is ignored
    torch.testing.assert_close(predictor(padded, mask, padded_context)[0], logits)
    with pytest.raises(ValueError, match="pass context"):
        predictor(records, mask)


def test_record_features_are_scale_free_and_exact():
    generator = torch.Generator().manual_seed(0)
    records = torch.randn(3, 7, 64, generator=generator).cumsum(dim=1)  # random walks
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, :4] = False
    features, valid = record_features(records, mask)
    # The same weights at another scale (another initialisation, another model) give the same inputs.
    torch.testing.assert_close(record_features(1e-3 * records, mask)[0], features, rtol=1e-4, atol=1e-4)
    assert valid[0].tolist() == [False] + [True] * 6 and valid[2].tolist() == [False] * 5 + [True] * 2
    step = (records[0, 3] - records[0, 2]).norm()
    steps = (records[0, 1:] - records[0, :-1]).norm(dim=-1)
    expected = [
        torch.log10(step / records[0, 3].norm()),
        step / steps.max(),
        torch.log10(step / steps[0]),
        torch.nn.functional.cosine_similarity(records[0, 3] - records[0, 2], records[0, 2] - records[0, 1], dim=0),
        (records[0, 3] - records[0, 0]).norm() / steps[:3].sum(),
        torch.log10(records[0, 3].norm() / records[0, 0].norm()),
    ]
    torch.testing.assert_close(features[0, 3], torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert torch.all(features[2, :5] == 0)  # padding and the first real record have no step
    lone, lone_valid = record_features(records[:1], torch.tensor([[False] * 6 + [True]]))
    assert lone_valid[0].tolist() == [False] * 6 + [True] and torch.all(lone == 0)  # one record: nothing moved yet


def test_predictor_is_the_papers_attention_on_scale_free_inputs():
    predictor = FreezePredictor()
    assert predictor.key[0].in_features == len(WEIGHT_FEATURES) + len(CONTEXT_FEATURES)
    assert FreezePredictor(context=False).key[0].in_features == len(WEIGHT_FEATURES)
    for mlp in (predictor.key, predictor.query, predictor.value, predictor.classifier):
        assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]  # the paper's 3-layer MLPs
    assert predictor.classifier[-1].out_features == 2


def test_shipped_predictor_carries_its_card_and_decides_deterministically():
    assert DEFAULT_PREDICTOR.exists(), "the package must ship its trained predictor"
    predictor = FreezePredictor.from_file()
    assert predictor.input_size == 1024 and not predictor.training
    card = predictor.metadata
    assert len(card["corpus"]["version"]) == 12 and len(card["corpus"]["families"]) >= 4
    assert card["features"][: len(WEIGHT_FEATURES)] == list(WEIGHT_FEATURES)
    assert set(card["leave_one_family_out_balanced_accuracy"]) == set(card["corpus"]["families"])
    records = torch.randn(20, 1024, generator=torch.Generator().manual_seed(0)).cumsum(dim=0)
    fractions = torch.linspace(0.05, 0.6, 20)
    first = predictor.freeze_probability(records, fractions, 0.5)
    assert FreezePredictor.from_file().freeze_probability(records, fractions, 0.5) == first
    assert 0.0 <= first <= 1.0


def test_predictor_file_round_trip_and_refusal(tmp_path):
    torch.manual_seed(0)
    predictor = FreezePredictor(input_size=32, hidden_size=8, key_size=4, classifier_hidden_size=4)
    predictor.save(tmp_path / "p.safetensors", corpus={"version": "abc"})
    loaded = FreezePredictor.from_file(tmp_path / "p.safetensors")
    x, context = torch.randn(3, 5, 32), torch.rand(3, 5, 2)
    torch.testing.assert_close(loaded(x, None, context)[0], predictor.eval()(x, None, context)[0], rtol=0, atol=0)
    assert loaded.metadata == {"corpus": {"version": "abc"}} and loaded.uses_context
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a SmartFRZ predictor"):
        FreezePredictor.from_file(tmp_path / "other.safetensors")
    old = {"format": "hf_freezecache.smartfrz-predictor/1", "sizes": "{}"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"), metadata=old)
    with pytest.raises(ValueError, match="raw weights from an earlier hf_freezecache: refit it"):
        FreezePredictor.from_file(tmp_path / "old.safetensors")


def test_weight_tailor_reads_the_same_weights_every_time():
    adapter = _adapter()
    tailor = WeightTailor(adapter, size=1024, seed=3)
    first = tailor.record(1)
    assert first.shape == (1024,) and first.dtype == torch.float32
    torch.testing.assert_close(WeightTailor(adapter, 1024, seed=3).record(1), first, rtol=0, atol=0)
    assert not torch.equal(WeightTailor(adapter, 1024, seed=4).record(1), first)
    with torch.no_grad():
        for p in adapter.block_parameters(1):
            p.add_(1.0)
    torch.testing.assert_close(tailor.record(1), first + 1.0)  # same positions, new values
    values = torch.cat([p.detach().reshape(-1) for p in adapter.block_parameters(1) if p.dim() >= 2])
    assert torch.isin(tailor.record(1), values).all()  # drawn from the weight kernels
    small = WeightTailor(adapter, size=100_000, seed=0)  # more than block 1 has: drawn with replacement
    assert small.record(1).shape == (100_000,)


def _predictor_file(tmp_path, freeze: bool):
    torch.manual_seed(0)
    predictor = FreezePredictor()
    with torch.no_grad():
        predictor.classifier[-1].bias.copy_(torch.tensor([0.0, 50.0]) if freeze else torch.tensor([50.0, 0.0]))
        predictor.classifier[-1].weight.zero_()
    path = tmp_path / f"{'freeze' if freeze else 'keep'}.safetensors"
    predictor.save(path)
    return str(path)


def test_smartfrz_records_a_window_and_decides_once_it_has_enough(tmp_path):
    adapter = _adapter()
    policy = _policy(
        SmartFRZConfig(predictor=_predictor_file(tmp_path, freeze=True), window=3, min_records=2), adapter
    )
    assert policy.blocks_to_freeze(_progress(1), frozenset()) == set()  # one record
    assert policy.blocks_to_freeze(_progress(2), frozenset({5})) == set(range(9)) - {5}
    assert 5 not in policy.history
    for step in range(3, 6):
        policy.blocks_to_freeze(_progress(step), frozenset())
    assert len(policy.history[0]) == 3  # the window keeps the last 3
    assert policy.evidence[0] == {"freeze_probability": pytest.approx(1.0), "records": 3.0}
    keep = _policy(SmartFRZConfig(predictor=_predictor_file(tmp_path, freeze=False)), adapter)
    assert all(not keep.blocks_to_freeze(_progress(step), frozenset()) for step in range(1, 12))


def test_history_windows_are_the_policys_windows_labelled_by_cka():
    records = np.arange(6 * 2 * 4, dtype=np.float32).reshape(6, 2, 4) ** 1.5  # 6 records, 2 blocks, 4 weights
    cka = np.array([[0.1, 0.5], [0.3, 0.5], [0.3, 0.5], [0.3, 0.9], [0.3, 0.2], [0.3, 0.88]])
    fractions = np.linspace(1 / 6, 1, 6)
    history = RunHistory("s/v", "fam", "data", "scratch", {}, records, cka, np.arange(1, 7) / 4, fractions)
    recipe = PredictorRecipe(window=3, min_records=2, label_tolerance=0.1)
    windows = HistoryWindows.from_histories([history], recipe)
    assert len(windows) == 5 * 2  # records 1..5 of both blocks
    by = {(int(b), int(t)): k for k, (b, t) in enumerate(zip(windows.blocks, windows.stages, strict=True))}
    assert [windows.targets[by[(0, t)]] for t in range(1, 6)] == [1, 1, 1, 1, 1]  # settled from record 1 on
    assert [windows.targets[by[(1, t)]] for t in range(1, 6)] == [0, 0, 0, 0, 1]  # settles only at the end
    # Example (block 1, record 4) is what the policy feeds the predictor after its 5th record.
    x, valid = windows.inputs(np.array([by[(1, 4)]]), context=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    features, _ = record_features(torch.from_numpy(records[2:5, 1])[None], mask)
    context = torch.tensor([[[fractions[2], 1.0], [fractions[3], 1.0], [fractions[4], 1.0]]], dtype=torch.float32)
    expected = torch.cat([features, context], dim=-1) * valid.unsqueeze(-1)
    torch.testing.assert_close(x, expected)
    ablated, _ = windows.inputs(np.array([by[(1, 4)]]), context=True, weights=False)  # the context-only ablation
    assert torch.all(ablated[..., : len(WEIGHT_FEATURES)] == 0)
    torch.testing.assert_close(ablated[..., len(WEIGHT_FEATURES) :], expected[..., len(WEIGHT_FEATURES) :])
    x, valid = windows.inputs(np.array([by[(0, 1)]]), context=False)  # two records, one padding slot
    assert valid[0].tolist() == [False, False, True] and x.shape[-1] == len(WEIGHT_FEATURES)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"freeze_policy": "autofreeze", "autofreeze_percentile": 150},
            r"--autofreeze_percentile must be in \[0, 100\]",
        ),
        ({"freeze_policy": "autofreeze", "autofreeze_evaluations_per_epoch": 0}, "at least 1, got 0"),
        ({"freeze_policy": "smartfrz", "smartfrz_min_records": 40}, "cannot exceed --smartfrz_window"),
        ({"freeze_policy": "smartfrz", "smartfrz_threshold": 1.0}, r"--smartfrz_threshold must be in \(0, 1\)"),
        ({"freeze_policy": "cka", "cka_reference": "x", "cka_window": 1}, "--cka_window >= 2"),
        ({"freeze_policy": "egeria", "egeria_slope_threshold": -1}, "--egeria_slope_threshold must be >= 0"),
        ({"freeze_policy": "egeria", "policy_probe_size": 1}, "--policy_probe_size must be at least 2"),
    ],
)
def test_bad_policy_options_are_refused_with_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        FreezeCacheArguments(**options)


def test_missing_predictor_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _policy(SmartFRZConfig(predictor=str(tmp_path / "nope.safetensors")))


# -- with the Trainer: timeline, logs, discard, resume ------------------------------------------------------------


@dataclass
class _OutOfOrderConfig(PolicyConfig):
    """No options."""


@register_policy("test-out-of-order", config=_OutOfOrderConfig)
class _OutOfOrder(FreezePolicy):
    """Freezes block 3 after epoch 1 and blocks 0-1 after epoch 2: a gap at block 2."""

    name = "test-out-of-order"

    def blocks_to_freeze(self, progress, frozen):
        self.evidence = {3: {"marker": 3.0}}
        return ({3} if progress.epoch >= 1 else set()) | ({0, 1} if progress.epoch >= 2 else set())


def _trainer(data, out, epochs=3, save="no", save_steps=None, **options):
    set_seed(0)
    model = CifarResNet.from_name("resnet20")
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        learning_rate=0.05,
        optim="sgd",
        logging_steps=1,
        save_strategy=save,
        save_steps=save_steps,
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    options.setdefault("feature_augmentation", "none")
    options.setdefault("cache_codec", "none")
    return FreezeCacheTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=collate_image_batch,
        freeze_args=FreezeCacheArguments(**options),
        cache_dataset=data.train_unaugmented if options.get("discard") else None,
    )


def test_out_of_order_freezing_discards_only_the_longest_frozen_prefix(data, tmp_path):
    trainer = _trainer(data, tmp_path, freeze_policy="test-out-of-order", discard=True)
    callback = trainer.freeze_callback
    trainer.train()
    assert callback.engine.frozen == {0, 1, 3}
    assert trainer.discarder.position == 2  # block 3 is frozen but stays in the model
    assert not any(p.requires_grad for p in callback.engine.adapter.block_parameters(3))
    assert any(p.requires_grad for p in callback.engine.adapter.block_parameters(2))
    report = json.loads((tmp_path / "cost_report.json").read_text())
    events = [(e["block"], e["epoch"]) for e in report["freeze_events"]]
    assert events == [(3, 1.0), (0, 2.0), (1, 2.0)]
    assert report["freeze_events"][0]["evidence"] == {"marker": 3.0}
    assert report["freeze_events"][0]["name"] == "layer2.0"  # block 3
    assert [s["discarded_prefix"] for s in report["states"]][-1] == 2
    assert "Freeze timeline" in (tmp_path / "cost_report.md").read_text()


def test_autofreeze_in_the_trainer_logs_its_evidence_and_times_itself(data, tmp_path):
    trainer = _trainer(data, tmp_path, freeze_policy="autofreeze", autofreeze_evaluations_per_epoch=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "autofreeze/change_rate_8" in h]
    assert logged, "the policy's evidence goes to the Trainer logs"
    report = json.loads((tmp_path / "cost_report.json").read_text())
    assert report["totals"]["policy_seconds"] > 0
    assert report["totals"]["policy_seconds"] < report["totals"]["wall_time_s"]
    for event in report["freeze_events"]:
        assert event["evidence"]["change_rate"] <= event["evidence"]["threshold"]


@pytest.mark.parametrize("policy", ["autofreeze", "smartfrz", "cka"])
def test_policy_state_survives_checkpoint_and_resume(data, tmp_path, policy):
    options = {"freeze_policy": policy}
    if policy == "autofreeze":
        options.update(autofreeze_evaluations_per_epoch=2)
    if policy == "smartfrz":
        options.update(smartfrz_min_records=2, smartfrz_window=4, smartfrz_records_per_epoch=2)
    if policy == "cka":
        reference = _trainer(data, tmp_path / "reference", epochs=1)
        reference.train()
        reference.save_model()
        options.update(cka_reference=str(tmp_path / "reference"), cka_window=2, cka_evaluations_per_epoch=2)
    full = _trainer(data, tmp_path / "full", save="steps", save_steps=6, **options)
    full.train()
    resumed = _trainer(data, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    a, b = full.freeze_callback, resumed.freeze_callback
    assert json.dumps(a.policy.state_dict(), sort_keys=True) == json.dumps(b.policy.state_dict(), sort_keys=True)
    assert a.engine.frozen == b.engine.frozen
    events = [
        json.loads((tmp_path / d / "cost_report.json").read_text())["freeze_events"] for d in ("full", "resumed")
    ]
    assert [(e["block"], e["step"]) for e in events[0]] == [(e["block"], e["step"]) for e in events[1]]
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(value, resumed.model.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)


def test_egeria_resume_takes_a_new_reference_first(data, tmp_path):
    # A window longer than the run: nothing freezes, so both runs evaluate the same blocks.
    options = {"freeze_policy": "egeria", "egeria_window": 50, "egeria_evaluations_per_epoch": 2}
    full = _trainer(data, tmp_path / "full", save="steps", save_steps=6, **options)
    full.train()
    resumed = _trainer(data, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    history_full, history_resumed = full.freeze_callback.policy.history, resumed.freeze_callback.policy.history
    saved = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["FreezeCacheCallback"]["attributes"]["resume_state"]["policy"]
    for block, values in state["history"].items():  # what was recorded before the checkpoint survives as is
        assert history_resumed[int(block)][: len(values)] == values
        # one evaluation after the resume only took the reference: one value fewer than the uninterrupted run
        assert len(history_resumed[int(block)]) == len(history_full[int(block)]) - 1


def test_cka_reference_saved_from_a_wrapped_timm_model_matches_the_viewed_module():
    # A run saves the whole model (`model.conv1.weight` inside timm's classifier wrapper); the adapter views the timm
    # network itself. The reference must load anyway, and a model compared with its own weights has CKA 1 everywhere.
    from hf_freezecache import FreezeCacheModel
    from hf_freezecache.models import build_model

    torch.manual_seed(0)
    model = FreezeCacheModel(build_model("timm:resnet10t", 10)).eval()
    saved = model.state_dict()
    assert not set(model.adapter.model.state_dict()) <= set(saved)  # the keys really differ
    images = torch.randn(8, 3, 32, 32)
    reference = ReferenceRepresentations(model.adapter, saved, images)
    outputs = BlockProbe(model.adapter, images).run()
    scores = reference.cka({index: output for index, (_, output) in outputs.items()})
    assert scores == pytest.approx(dict.fromkeys(range(model.adapter.num_blocks), 1.0), abs=1e-6)
    with pytest.raises(ValueError, match="does not match the model being trained"):
        ReferenceRepresentations(model.adapter, {"model.other.weight": torch.zeros(1)}, images)


def test_representation_policies_work_on_a_vision_transformer(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**TINY_VIT, num_labels=10)
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    torch.save(ViTForImageClassification(config).state_dict(), tmp_path / "reference.bin")
    adapter = get_block_adapter(model)
    probe = BlockProbe(adapter, torch.randn(8, 3, 32, 32))
    cka = _policy(CKAConfig(reference=str(tmp_path / "reference.bin"), window=2), adapter)
    cka.set_probe(probe)
    egeria = _policy(EgeriaConfig(window=2), adapter)
    egeria.set_probe(probe)
    smartfrz = _policy(SmartFRZConfig(min_records=1), adapter)
    for step in (1, 2):
        for policy in (cka, egeria, smartfrz):
            policy.blocks_to_freeze(_progress(step), frozenset())
    assert set(cka.evidence) == set(range(3)) and all(0 <= e["cka"] <= 1 + 1e-9 for e in cka.evidence.values())
    assert all(e["plasticity"] < 0.02 for e in egeria.evidence.values())  # nothing trained: bf16 rounding only
    assert set(smartfrz.evidence) == set(range(3))
