"""Freezing policies: one file per policy with its config class, all behind the `POLICIES` registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .._registry import Registry
from ._probe import BlockProbe, linear_cka
from .base import FreezePolicy, PolicyConfig, TrainingProgress, schedule_factor


class PolicyRegistry(Registry[FreezePolicy]):
    """The freeze-policy registry: every policy is registered with a config class of its own (a `PolicyConfig`
    subclass), which `build_policy` builds it from."""

    def __init__(self) -> None:
        super().__init__("freeze policy")

    def register(self, name: str, *, config: type[PolicyConfig]) -> Callable[[type[FreezePolicy]], type[FreezePolicy]]:
        """Class decorator registering a `FreezePolicy` subclass as `name`, configured by instances of `config`."""

        def decorator(cls: type[FreezePolicy]) -> type[FreezePolicy]:
            if not (isinstance(config, type) and issubclass(config, PolicyConfig) and config is not PolicyConfig):
                raise TypeError(f"The config of policy {name!r} must be a PolicyConfig subclass, got {config!r}.")
            # build_policy finds the policy from the config's class, so two policies cannot share one.
            owner = next((other for other, known in self._configs.items() if known is config), None)
            if owner is not None:
                raise ValueError(
                    f"{config.__name__} is already the config of policy {owner!r}; give {name!r} its own config class."
                )
            if cls.needs_probe and "probe_size" not in {f.name for f in dataclasses.fields(config)}:
                raise TypeError(f"Policy {name!r} sets needs_probe, so {config.__name__} needs a probe_size field.")
            return super(PolicyRegistry, self).register(name, config=config)(cls)

        return decorator

    def name_of(self, config: PolicyConfig) -> str:
        """The name of the policy whose config class `config` is an instance of."""
        name = next((name for name, known in self._configs.items() if type(config) is known), None)
        if name is None:
            raise ValueError(
                f"{type(config).__name__} is not the config class of a registered policy; register the policy with "
                f"@register_policy(name, config={type(config).__name__})."
            )
        return name


POLICIES = PolicyRegistry()
register_policy = POLICIES.register

# Importing each policy's file registers the policy.
from .autofreeze import AutoFreezeConfig  # noqa: E402
from .cka import CKAConfig  # noqa: E402
from .egeria import EgeriaConfig  # noqa: E402
from .fixed import FixedScheduleConfig  # noqa: E402
from .freezeout import FreezeOutConfig  # noqa: E402
from .none import NoFreezingConfig  # noqa: E402
from .smartfrz import SmartFRZConfig  # noqa: E402


def build_policy(config: PolicyConfig) -> FreezePolicy:
    """Instantiates the policy `config` is the config of, e.g. `build_policy(FreezeOutConfig(t0=0.3))`."""
    return POLICIES.get(POLICIES.name_of(config))(config)


__all__ = [
    "POLICIES",
    "AutoFreezeConfig",
    "BlockProbe",
    "CKAConfig",
    "EgeriaConfig",
    "FixedScheduleConfig",
    "FreezeOutConfig",
    "FreezePolicy",
    "NoFreezingConfig",
    "PolicyConfig",
    "PolicyRegistry",
    "SmartFRZConfig",
    "TrainingProgress",
    "schedule_factor",
    "build_policy",
    "linear_cka",
    "register_policy",
]
