import dataclasses
import math
import typing
from dataclasses import dataclass, field

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_freezecache import FreezeCacheArguments, FreezeCacheCallback, FreezeCacheModel
from hf_freezecache._flat_options import component_config, flat_fields, flat_option
from hf_freezecache.models import CifarResNet, get_block_adapter
from hf_freezecache.policies import (
    POLICIES,
    AutoFreezeConfig,
    CKAConfig,
    EgeriaConfig,
    FixedScheduleConfig,
    FreezeOutConfig,
    FreezePolicy,
    NoFreezingConfig,
    PolicyConfig,
    SmartFRZConfig,
    TrainingProgress,
    build_policy,
    register_policy,
    schedule_factor,
)

BUILT_IN = ["autofreeze", "cka", "egeria", "fixed", "freezeout", "none", "smartfrz"]


def _progress(step, max_steps=100, epochs=10.0):
    return TrainingProgress(step, max_steps, epoch=step / max_steps * epochs, num_train_epochs=epochs)


def _policy(config):
    policy = build_policy(config)
    policy.setup(get_block_adapter(CifarResNet.from_name("resnet20")))  # 9 blocks
    return policy


def test_freezeout_times_are_spaced_from_t0_to_the_end():
    linear = _policy(FreezeOutConfig(t0=0.5))
    assert linear.freeze_times == pytest.approx([0.5 + 0.5 * i / 9 for i in range(9)])
    cubic = _policy(FreezeOutConfig(t0=0.5, scaling="cubic"))
    assert cubic.freeze_times == pytest.approx([(0.5 + 0.5 * i / 9) ** 3 for i in range(9)])
    assert linear.blocks_to_freeze(_progress(49), frozenset()) == set()
    assert linear.blocks_to_freeze(_progress(50), frozenset()) == {0}
    assert linear.blocks_to_freeze(_progress(62), frozenset()) == {0, 1, 2}


def test_freezeout_anneals_each_block_to_zero_at_its_freeze_time():
    policy = _policy(FreezeOutConfig(t0=0.5))
    scales = policy.lr_scales(_progress(25), frozenset())
    assert scales[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25 / 0.5)))
    assert policy.lr_scales(_progress(50), frozenset())[0] == pytest.approx(0.0)
    assert 0 not in policy.lr_scales(_progress(60), frozenset({0}))
    assert _policy(FreezeOutConfig(anneal_lr=False)).lr_scales(_progress(25), frozenset()) == {}
    scaled = _policy(FreezeOutConfig(anneal_lr=False, scale_lr=True))
    assert scaled.lr_scales(_progress(0), frozenset())[0] == pytest.approx(2.0)


def test_freezeout_replaces_the_global_schedule_for_the_blocks_it_anneals_unless_asked_to_multiply():
    cosine = 0.5 * (1 + math.cos(math.pi * 0.25 / 0.5))
    # Halfway down a global schedule (factor 0.4): the scale divides it out, so block 0's rate is the cosine's.
    progress = dataclasses.replace(_progress(25), schedule_factor=0.4)
    assert _policy(FreezeOutConfig(t0=0.5)).lr_scales(progress, frozenset())[0] == pytest.approx(cosine / 0.4)
    multiply = _policy(FreezeOutConfig(t0=0.5, anneal_mode="multiply"))
    assert multiply.lr_scales(progress, frozenset())[0] == pytest.approx(cosine)
    # Warmup's first step (factor 0) sets no rate by scaling: the plain cosine.
    warmup = dataclasses.replace(_progress(25), schedule_factor=0.0)
    assert _policy(FreezeOutConfig(t0=0.5)).lr_scales(warmup, frozenset())[0] == pytest.approx(cosine)
    with pytest.raises(ValueError, match="--freezeout_anneal_mode must be 'replace' or 'multiply', got 'add'"):
        FreezeOutConfig(anneal_mode="add")


def test_schedule_factor_reads_torch_and_accelerate_schedulers():
    import torch
    from accelerate.scheduler import AcceleratedScheduler
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    assert schedule_factor(None) == 1.0 and schedule_factor(scheduler) == pytest.approx(1.0)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert schedule_factor(scheduler) == pytest.approx(0.5)
    assert schedule_factor(AcceleratedScheduler(scheduler, optimizer, step_with_optimizer=False)) == pytest.approx(0.5)


def test_under_a_cosine_trainer_schedule_freezeout_gives_each_block_the_published_learning_rate(tmp_path):
    """End to end through `Trainer` (plain SGD, cosine schedule): block 0's effective learning rate, measured as
    its update over its gradient, is 0.5 lr (1 + cos(pi t / t_0)), and the head's follows the Trainer's cosine."""
    import torch
    from transformers import Trainer, TrainerCallback

    from hf_freezecache import FreezeCacheTrainer

    torch.manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 10} for i in range(32)]
    model = CifarResNet.from_name("resnet20", num_classes=10)
    steps, lr, t0 = 8, 0.05, 0.5

    class EffectiveRates(TrainerCallback):
        def __init__(self):
            self.rates = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            stem, head = model.base_model.conv1.weight, model.base_model.linear.weight
            self.before = [(p, p.detach().clone(), p.grad) for p in (stem, head)]

        def on_step_end(self, args, state, control, **kwargs):
            rates = []
            for param, old, grad in self.before:  # a frozen block has no gradient
                mask = grad.abs() > 1e-6 if grad is not None else None
                rates.append(float(((old - param.detach())[mask] / grad[mask]).median()) if grad is not None else None)
            self.rates.append(rates)

    recorder = EffectiveRates()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=4,
        learning_rate=lr, lr_scheduler_type="cosine", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
        save_strategy="no", logging_strategy="no", seed=0,
    )  # fmt: skip
    trainer = FreezeCacheTrainer(
        model=model, args=args, train_dataset=images, callbacks=[recorder],
        freeze_args=FreezeCacheArguments(freeze_policy="freezeout", freezeout_t0=t0),
    )  # fmt: skip
    assert isinstance(trainer, Trainer)
    trainer.train()
    assert len(recorder.rates) == steps and all(stem is None for stem, _ in recorder.rates[4:])  # frozen at t0
    for step, (stem, _) in enumerate(recorder.rates[:4]):
        assert stem == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * step / steps / t0)), rel=1e-3, abs=1e-7)
    for step, (_, head) in enumerate(recorder.rates):
        assert head == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * step / steps)), rel=1e-3)


def test_fixed_schedule_freezes_prefixes_at_epochs():
    policy = _policy(FixedScheduleConfig(schedule="3:3,6.5:6"))
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
        FreezeCacheCallback(args, model=FreezeCacheModel(CifarResNet.from_name("resnet20")))


@pytest.mark.parametrize(
    "config_class, values, message",
    [
        (FreezeOutConfig, {"t0": 0}, r"^--freezeout_t0 must be in \(0, 1\], got 0\.$"),
        (FixedScheduleConfig, {}, "--freeze_policy fixed needs --freeze_schedule"),
        (AutoFreezeConfig, {"percentile": -1.0}, r"--autofreeze_percentile must be in \[0, 100\], got -1.0"),
        (SmartFRZConfig, {"window": 0}, "--smartfrz_window must be at least 1, got 0"),
        (CKAConfig, {"reference": "ref", "tolerance": 0.0}, "--cka_tolerance must be > 0, got 0.0"),
        (CKAConfig, {"reference": "ref", "probe_size": 1}, "--policy_probe_size must be at least 2, got 1"),
        (EgeriaConfig, {"probe_size": 1}, "--policy_probe_size must be at least 2, got 1"),
    ],
)
def test_a_policy_config_rejects_a_bad_value_naming_its_flag(config_class, values, message):
    with pytest.raises(ValueError, match=message):
        config_class(**values)


# -- configs, the registry, and the flat flags --------------------------------------------------------------------

# Every policy flag, set to a valid value that is not its default, and the config it must build.
NON_DEFAULT_FLAGS = {
    "none": ({}, NoFreezingConfig()),
    "freezeout": (
        {
            "freezeout_t0": "0.3",
            "freezeout_scaling": "cubic",
            "freezeout_anneal_lr": "false",
            "freezeout_anneal_mode": "multiply",
            "freezeout_scale_lr": "true",
        },
        FreezeOutConfig(t0=0.3, scaling="cubic", anneal_lr=False, anneal_mode="multiply", scale_lr=True),
    ),
    "fixed": ({"freeze_schedule": "2:3,4:6"}, FixedScheduleConfig(schedule="2:3,4:6")),
    "autofreeze": (
        {"autofreeze_evaluations_per_epoch": "3", "autofreeze_percentile": "25"},
        AutoFreezeConfig(evaluations_per_epoch=3, percentile=25.0),
    ),
    "smartfrz": (
        {
            "smartfrz_predictor": "p.safetensors",
            "smartfrz_records_per_epoch": "2",
            "smartfrz_window": "12",
            "smartfrz_min_records": "3",
            "smartfrz_threshold": "0.7",
            "smartfrz_seed": "5",
        },
        SmartFRZConfig(
            predictor="p.safetensors", records_per_epoch=2, window=12, min_records=3, threshold=0.7, seed=5
        ),
    ),
    "cka": (
        {
            "cka_reference": "ref",
            "cka_evaluations_per_epoch": "2",
            "cka_window": "3",
            "cka_tolerance": "0.05",
            "policy_probe_size": "64",
        },
        CKAConfig(reference="ref", evaluations_per_epoch=2, window=3, tolerance=0.05, probe_size=64),
    ),
    "egeria": (
        {
            "egeria_evaluations_per_epoch": "2",
            "egeria_window": "3",
            "egeria_slope_threshold": "0.05",
            "policy_probe_size": "64",
        },
        EgeriaConfig(evaluations_per_epoch=2, window=3, slope_threshold=0.05, probe_size=64),
    ),
}


def _policy_flags():
    return {
        name: targets
        for name, targets in flat_fields(FreezeCacheArguments).items()
        if any(issubclass(config_class, PolicyConfig) for config_class, _ in targets)
    }


def test_every_registered_policy_has_a_config_class_of_its_own():
    assert set(BUILT_IN) <= set(POLICIES.names())
    seen = {}
    for name, policy_class in POLICIES:
        config_class = POLICIES.config_class(name)
        assert issubclass(config_class, PolicyConfig) and dataclasses.is_dataclass(config_class), name
        assert config_class not in seen, f"{name} shares {config_class.__name__} with {seen.get(config_class)}"
        seen[config_class] = name
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        assert not policy_class.needs_probe or "probe_size" in fields, name
        for f in fields.values():
            assert f.metadata.get("help"), f"{config_class.__name__}.{f.name} has no help"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_a_policy_is_registered_with_a_config_class_of_its_own():
    class Shared(FreezePolicy):
        def blocks_to_freeze(self, progress, frozen):
            return set()

    with pytest.raises(ValueError, match="FreezeOutConfig is already the config of policy 'freezeout'"):
        register_policy("test-shared-config", config=FreezeOutConfig)(Shared)

    @dataclass
    class NoProbeSize(PolicyConfig):
        """No options."""

    class Probing(Shared):
        needs_probe = True

    with pytest.raises(TypeError, match="sets needs_probe, so NoProbeSize needs a probe_size field"):
        register_policy("test-probing", config=NoProbeSize)(Probing)
    assert "test-shared-config" not in POLICIES and "test-probing" not in POLICIES
    with pytest.raises(ValueError, match="NoProbeSize is not the config class of a registered policy"):
        build_policy(NoProbeSize())


def test_every_policy_flag_has_its_config_fields_default_help_and_type():
    flat = {f.name: f for f in dataclasses.fields(FreezeCacheArguments)}
    hints = typing.get_type_hints(FreezeCacheArguments)
    for name, targets in _policy_flags().items():
        for config_class, field_name in targets:
            source = {f.name: f for f in dataclasses.fields(config_class)}[field_name]
            assert flat[name].default == source.default, name
            assert hints[name] == typing.get_type_hints(config_class)[field_name], name
            if len(targets) == 1:
                assert flat[name].metadata == {"help": source.metadata["help"]}, name
    # One flag feeds the probe size of both probing policies; its help says so.
    assert _policy_flags()["policy_probe_size"] == ((CKAConfig, "probe_size"), (EgeriaConfig, "probe_size"))
    assert flat["policy_probe_size"].metadata["help"].startswith("Policies 'cka' and 'egeria'")
    fed = {target for targets in _policy_flags().values() for target in targets}
    shipped = [name for name, cls in POLICIES if cls.__module__.startswith("hf_freezecache.policies.")]
    assert set(BUILT_IN) <= set(shipped)
    for policy in shipped:
        config_class = POLICIES.config_class(policy)
        for f in dataclasses.fields(config_class):
            assert (config_class, f.name) in fed, f"no flag feeds {config_class.__name__}.{f.name}"


def test_the_round_trip_table_covers_every_policy_flag():
    assert set(NON_DEFAULT_FLAGS) == set(BUILT_IN)
    assert {flag for flags, _ in NON_DEFAULT_FLAGS.values() for flag in flags} == set(_policy_flags())
    for _, expected in NON_DEFAULT_FLAGS.values():
        for f in dataclasses.fields(expected):
            assert getattr(expected, f.name) != f.default, f"{type(expected).__name__}.{f.name} is its default"


@pytest.mark.parametrize("policy", sorted(NON_DEFAULT_FLAGS))
def test_every_policy_flag_lands_in_its_config_field(policy, tmp_path):
    flags, expected = NON_DEFAULT_FLAGS[policy]
    argv = ["--output_dir", str(tmp_path), "--freeze_policy", policy]
    for flag, value in flags.items():
        argv += [f"--{flag}", value]
    _, arguments = HfArgumentParser((TrainingArguments, FreezeCacheArguments)).parse_args_into_dataclasses(argv)
    config = arguments.policy_config()
    assert type(config) is POLICIES.config_class(policy)
    assert config == expected
    assert type(build_policy(config)) is POLICIES.get(policy)


def test_policy_options_of_another_policy_do_not_reach_the_config():
    arguments = FreezeCacheArguments(freeze_policy="egeria", cka_window=7, policy_probe_size=32)
    assert arguments.policy_config() == EgeriaConfig(probe_size=32)


# -- the flat-option helper, on components that are not policies --------------------------------------------------


@dataclass
class _Codec:
    level: int = field(default=3, metadata={"help": "Codec: compression level."})
    name: str = field(default="zfp", metadata={"help": "Codec: its name."})

    def __post_init__(self):
        if self.level < 0:
            raise ValueError(f"--codec_level must be >= 0, got {self.level}.")


@dataclass
class _Sidecar:
    level: int = field(default=3, metadata={"help": "Sidecar: compression level."})


@dataclass
class _Options:
    codec_level: int = flat_option(_Codec, "level", also=[(_Sidecar, "level")], help="Both: level.")
    codec_name: str = flat_option(_Codec, "name")
    unrelated: int = 0


@dataclass
class _MoreOptions(_Options):
    sidecar_extra: int = 1


def test_flat_options_declare_fields_from_any_component_config_and_build_it():
    fields = {f.name: f for f in dataclasses.fields(_Options)}
    assert fields["codec_name"].default == "zfp" and fields["codec_name"].metadata == {"help": "Codec: its name."}
    assert fields["codec_level"].default == 3 and fields["codec_level"].metadata == {"help": "Both: level."}
    assert flat_fields(_Options) == {
        "codec_level": ((_Codec, "level"), (_Sidecar, "level")),
        "codec_name": ((_Codec, "name"),),
    }
    assert flat_fields(_MoreOptions) == flat_fields(_Options)  # a subclass keeps its parent's flat fields
    options = _MoreOptions(codec_level=7, codec_name="int8")
    assert component_config(options, _Codec) == _Codec(level=7, name="int8")
    assert component_config(options, _Sidecar) == _Sidecar(level=7)
    with pytest.raises(ValueError, match="--codec_level must be >= 0, got -1"):
        component_config(_Options(codec_level=-1), _Codec)
    with pytest.raises(ValueError, match="_Codec has no field 'levle'; its fields are level, name"):
        flat_option(_Codec, "levle")
    with pytest.raises(ValueError, match=r"_Codec.name \(default 'zfp'\) and _Sidecar.level \(default 3\)"):
        flat_option(_Codec, "name", also=[(_Sidecar, "level")])
