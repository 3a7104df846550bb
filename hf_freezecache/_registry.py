"""A small name -> class registry shared by policies, codecs, sidecars, augmentations and model adapters."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes so that adding a new policy, codec or adapter is one file with one decorator.

    Args:
        kind (`str`): What is registered ("freeze policy", "block adapter", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, *, config: type | None = None) -> Callable[[type[T]], type[T]]:
        """Class decorator registering `cls` under `name`, with the config dataclass its options live in (if any)."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"A {self.kind} named {name!r} is already registered ({self._entries[name]}).")
            self._entries[name] = cls
            if config is not None:
                self._configs[name] = config
            return cls

        return decorator

    def config_classes(self) -> dict[str, type]:
        """The config dataclass of every entry registered with one, by name (sorted)."""
        return {name: self._configs[name] for name in sorted(self._configs)}

    def config_class(self, name: str) -> type | None:
        """The config dataclass registered with `name` (None when it was registered without one)."""
        self.get(name)  # an unknown name raises, listing the known ones
        return self._configs.get(name)

    def get(self, name: str) -> type[T]:
        """Returns the class registered as `name`, or raises a `ValueError` listing the known names."""
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} {reprlib.repr(name)}. Known: {', '.join(sorted(self._entries))}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[tuple[str, type[T]]]:
        return iter(self._entries.items())
