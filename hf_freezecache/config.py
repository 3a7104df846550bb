"""`FreezeCacheArguments`: every hf_freezecache option, parseable by `HfArgumentParser` next to `TrainingArguments`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FreezeCacheArguments:
    """What to freeze and when. Policy-specific options carry the policy's name as a prefix.

    All values are checked when the object is created, so a bad flag fails before any model or data is loaded.
    """

    freeze_policy: str = field(
        default="none",
        metadata={
            "help": "Freezing policy: 'none' (baseline), 'freezeout' (Brock et al. 2017), 'fixed' (a schedule)."
        },
    )
    freezeout_t0: float = field(
        default=0.5,
        metadata={
            "help": "FreezeOut: fraction of training, in (0, 1], at which block 0 freezes; the other blocks are "
            "spaced from there to the end of training."
        },
    )
    freezeout_scaling: str = field(
        default="linear",
        metadata={
            "help": "FreezeOut: spacing of the freeze times, 'linear' or 'cubic' (t_i = (t_0 + (1-t_0) i/n)^3)."
        },
    )
    freezeout_anneal_lr: bool = field(
        default=True,
        metadata={
            "help": "FreezeOut: cosine-anneal each block's learning rate to zero at its freeze time, on top of the "
            "Trainer's schedule. False keeps the global schedule and only freezes at t_i."
        },
    )
    freezeout_scale_lr: bool = field(
        default=False,
        metadata={"help": "FreezeOut: multiply block i's learning rate by 1/t_i (FreezeOut's scale_lr option)."},
    )
    freeze_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Policy 'fixed': 'EPOCH:POSITION,...', e.g. '30:5,60:10' freezes blocks 0-4 at epoch 30 and "
            "blocks 0-9 at epoch 60. Epochs may be fractional."
        },
    )
    block_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated qualified names of the freezable blocks, in forward order, for a model that no "
            "built-in adapter supports (selects the generic adapter)."
        },
    )
    stem_modules: str | None = field(
        default=None,
        metadata={"help": "With --block_modules: comma-separated modules that run before the first block, in order."},
    )
    head_modules: str | None = field(
        default=None,
        metadata={"help": "With --block_modules: comma-separated modules that run after the last block, in order."},
    )
    cost_report: bool = field(
        default=True,
        metadata={"help": "Measure FLOPs and memory of every freeze state and write cost_report.json/.md at the end."},
    )

    def __post_init__(self) -> None:
        from .policies import POLICIES

        if self.freeze_policy not in POLICIES:
            raise ValueError(
                f"--freeze_policy {self.freeze_policy!r} is not a known policy; choose one of "
                f"{', '.join(POLICIES.names())}."
            )
        if not 0.0 < self.freezeout_t0 <= 1.0:
            raise ValueError(f"--freezeout_t0 must be in (0, 1], got {self.freezeout_t0}.")
        if self.freezeout_scaling not in ("linear", "cubic"):
            raise ValueError(f"--freezeout_scaling must be 'linear' or 'cubic', got {self.freezeout_scaling!r}.")
        if self.freeze_schedule is not None and self.freeze_policy != "fixed":
            raise ValueError(
                f"--freeze_schedule is only used by --freeze_policy fixed, but the policy is {self.freeze_policy!r}."
            )
        if (self.stem_modules or self.head_modules) and not self.block_modules:
            raise ValueError("--stem_modules and --head_modules describe a generic model and need --block_modules.")
        POLICIES.get(self.freeze_policy).check_arguments(self)

    def adapter_modules(self) -> dict[str, list[str] | None]:
        """The generic-adapter module names as lists: the keyword arguments of `get_block_adapter`."""
        names = {
            "block_modules": self.block_modules,
            "stem_modules": self.stem_modules,
            "head_modules": self.head_modules,
        }
        return {
            key: [n.strip() for n in value.split(",") if n.strip()] if value else None for key, value in names.items()
        }

    def to_dict(self) -> dict:
        return asdict(self)
