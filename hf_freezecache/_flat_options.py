"""Flat `HfArgumentParser` fields declared from the fields of component config dataclasses.

`FreezeCacheArguments` stays one flat set of flags (`--freezeout_t0`, `--policy_probe_size`, ...) while every
component owns and validates a config dataclass of its own (`FreezeOutConfig.t0`, ...). A flat field declared with
`flat_option` takes its default and help from the component field it feeds, so neither is written twice, and
`component_config` builds a component's config from the flat object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

# The component fields each flat field feeds, keyed by the flat `Field` object (a dataclass and its subclasses share
# them). Not in the field's metadata: `HfArgumentParser` hands every metadata key to argparse, which rejects unknown
# ones.
_TARGETS: dict[dataclasses.Field, tuple[tuple[type, str], ...]] = {}


def _component_field(config_class: type, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if name not in fields:
        raise ValueError(f"{config_class.__name__} has no field {name!r}; its fields are {', '.join(fields)}.")
    return fields[name]


def flat_option(
    config_class: type, name: str, *, also: Iterable[tuple[type, str]] = (), help: str | None = None
) -> Any:
    """A flat dataclass field that feeds field `name` of the config dataclass `config_class`.

    The flat field gets that field's default (or default factory) and help text.

    Args:
        config_class (`type`): The component's config dataclass.
        name (`str`): The field of `config_class` the flat field feeds.
        also (`Iterable[tuple[type, str]]`, *optional*): Further `(config class, field name)` pairs the same flat field
            feeds; their defaults must equal the first one's.
        help (`str`, *optional*): The flat field's help, instead of the component field's (say what the flag means
            to every component it feeds).

    Example:

    ```python
    @dataclass
    class FreezeCacheArguments:
        freezeout_t0: float = flat_option(FreezeOutConfig, "t0")
        policy_probe_size: int = flat_option(
            CKAConfig, "probe_size", also=[(EgeriaConfig, "probe_size")], help="Policies 'cka' and 'egeria': ..."
        )
    ```
    """
    targets = ((config_class, name), *also)
    source, *others = (_component_field(cls, field_name) for cls, field_name in targets)
    for (cls, field_name), other in zip(targets[1:], others, strict=True):
        if (other.default, other.default_factory) != (source.default, source.default_factory):
            raise ValueError(
                f"A flat option feeds {config_class.__name__}.{name} (default {source.default!r}) and "
                f"{cls.__name__}.{field_name} (default {other.default!r}): their defaults must be the same."
            )
    text = help if help is not None else source.metadata.get("help")
    metadata = {"help": text} if text is not None else {}
    flat = dataclasses.field(default=source.default, default_factory=source.default_factory, metadata=metadata)
    _TARGETS[flat] = targets
    return flat


def flat_fields(options_class: type) -> dict[str, tuple[tuple[type, str], ...]]:
    """The fields of the dataclass `options_class` declared with `flat_option`, as `{flat name: ((config class,
    field name), ...)}`."""
    return {f.name: _TARGETS[f] for f in dataclasses.fields(options_class) if f in _TARGETS}


def component_config(options: Any, config_class: type[ConfigT]) -> ConfigT:
    """Builds `config_class` from the flat fields of the dataclass instance `options` that feed it; its other fields
    keep their defaults. The config validates itself (`__post_init__`), so a bad value raises here.

    Example: `component_config(FreezeCacheArguments(freezeout_t0=0.3), FreezeOutConfig)` is `FreezeOutConfig(t0=0.3)`.
    """
    values = {
        field_name: getattr(options, flat_name)
        for flat_name, targets in flat_fields(type(options)).items()
        for cls, field_name in targets
        if cls is config_class
    }
    return config_class(**values)
