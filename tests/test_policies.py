import math

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_freezecache import FreezeCacheArguments, FreezeCacheCallback
from hf_freezecache.models import CifarResNet, get_block_adapter
from hf_freezecache.policies import TrainingProgress, build_policy


def _progress(step, max_steps=100, epochs=10.0):
    return TrainingProgress(step, max_steps, epoch=step / max_steps * epochs, num_train_epochs=epochs)


def _policy(**kwargs):
    policy = build_policy(FreezeCacheArguments(**kwargs))
    policy.setup(get_block_adapter(CifarResNet.from_name("resnet20")))  # 9 blocks
    return policy


def test_freezeout_times_are_spaced_from_t0_to_the_end():
    linear = _policy(freeze_policy="freezeout", freezeout_t0=0.5)
    assert linear.freeze_times == pytest.approx([0.5 + 0.5 * i / 9 for i in range(9)])
    cubic = _policy(freeze_policy="freezeout", freezeout_t0=0.5, freezeout_scaling="cubic")
    assert cubic.freeze_times == pytest.approx([(0.5 + 0.5 * i / 9) ** 3 for i in range(9)])
    assert linear.blocks_to_freeze(_progress(49), frozenset()) == set()
    assert linear.blocks_to_freeze(_progress(50), frozenset()) == {0}
    assert linear.blocks_to_freeze(_progress(62), frozenset()) == {0, 1, 2}


def test_freezeout_anneals_each_block_to_zero_at_its_freeze_time():
    policy = _policy(freeze_policy="freezeout", freezeout_t0=0.5)
    scales = policy.lr_scales(_progress(25), frozenset())
    assert scales[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25 / 0.5)))
    assert policy.lr_scales(_progress(50), frozenset())[0] == pytest.approx(0.0)
    assert 0 not in policy.lr_scales(_progress(60), frozenset({0}))
    assert _policy(freeze_policy="freezeout", freezeout_anneal_lr=False).lr_scales(_progress(25), frozenset()) == {}
    scaled = _policy(freeze_policy="freezeout", freezeout_anneal_lr=False, freezeout_scale_lr=True)
    assert scaled.lr_scales(_progress(0), frozenset())[0] == pytest.approx(2.0)


def test_fixed_schedule_freezes_prefixes_at_epochs():
    policy = _policy(freeze_policy="fixed", freeze_schedule="3:3,6.5:6")
    assert policy.blocks_to_freeze(_progress(29), frozenset()) == set()
    assert policy.blocks_to_freeze(_progress(30), frozenset()) == {0, 1, 2}
    assert policy.blocks_to_freeze(_progress(65), frozenset()) == set(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"freeze_policy": "bogus"},
            "--freeze_policy 'bogus' is not a known policy; choose one of autofreeze, cka, egeria, fixed",
        ),
        ({"freeze_policy": "freezeout", "freezeout_t0": 0.0}, r"--freezeout_t0 must be in \(0, 1\], got 0.0"),
        ({"freeze_policy": "freezeout", "freezeout_t0": 1.5}, r"--freezeout_t0 must be in \(0, 1\], got 1.5"),
        ({"freeze_policy": "freezeout", "freezeout_scaling": "square"}, "'linear' or 'cubic', got 'square'"),
        ({"freeze_policy": "fixed"}, "--freeze_policy fixed needs --freeze_schedule"),
        ({"freeze_policy": "fixed", "freeze_schedule": "30-5"}, "entry '30-5' is not EPOCH:POSITION"),
        ({"freeze_policy": "fixed", "freeze_schedule": "30:5,20:10"}, "epochs and positions must both increase"),
        ({"freeze_policy": "none", "freeze_schedule": "1:2"}, "only used by --freeze_policy fixed"),
        ({"stem_modules": "conv1"}, "need --block_modules"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreezeCacheArguments(**kwargs)


def test_bad_flags_fail_at_parse_time_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, FreezeCacheArguments))
    with pytest.raises(ValueError, match="--freezeout_t0 must be in"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--freeze_policy", "freezeout", "--freezeout_t0", "2"]
        )
    _, parsed = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--freeze_policy", "freezeout"])
    assert parsed.freeze_policy == "freezeout" and parsed.freezeout_t0 == 0.5


def test_a_position_beyond_the_model_is_rejected_before_training():
    args = FreezeCacheArguments(freeze_policy="fixed", freeze_schedule="1:3,2:12")
    with pytest.raises(ValueError, match="position 12 is beyond the model: this cifar-resnet model has 9 blocks"):
        FreezeCacheCallback(args, model=CifarResNet.from_name("resnet20"))
