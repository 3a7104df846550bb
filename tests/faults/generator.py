"""Seeded faults over activation caches and their Hub exports: what each one does, and `faults(seed, n, manifests)`.

A fault names its target (a base cache of `bases.TARGETS`), the kind of file it touches and JSON parameters;
`Fault.apply(folder, donors)` damages a copy of the target in `folder` (`donors`: every base's folder, for swaps).
Faults are drawn kind by kind in a fixed weighted rotation, so any prefix of the sequence covers every kind; within
a kind, the variants (file kinds, manifest fields and value classes, catalog entries) come round in turn, shuffled
by the seed.
"""

from __future__ import annotations

import os
import random
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_freezecache.cache.manifest import MANIFEST_NAME

from .catalog import EXTRA_FILES, SWAPS, renames, semantic_edits
from .damage import APPLY
from .values import VALUE_CLASSES, bad_value, field_name, fields, get

#: Kinds of faults and their weight in the rotation (`kill` faults are drawn by `kills.kill_faults`).
KINDS = {
    "byte-flip": 3,
    "truncate": 1,
    "delete": 1,
    "rename": 1,
    "extra-file": 1,
    "manifest-field": 8,  # 120 of 300 faults: every field of the targets' manifests at least once
    "manifest-semantic": 3,
    "swap": 2,
}
#: Every kind of file a cache holds, by layout.
FILE_KINDS = [("arrow", kind) for kind in ("manifest", "card", "shard", "state.json", "dataset_info.json")] + [
    ("parquet", kind) for kind in ("manifest", "card", "shard")
]


@dataclass(frozen=True)
class Fault:
    """One fault.

    Args:
        kind (`str`): One of `KINDS` or `"kill"`: the tally's row.
        target (`str`): The base cache it damages (`bases.TARGETS`; for a kill, the base being built).
        file (`str`): The kind of file it touches (`"manifest"`, `"card"`, `"shard"`, `"state.json"`,
            `"dataset_info.json"`), or `"folder"`.
        params (`dict`): What `apply` needs, JSON-serialisable (large values are derived from a seed when applied).
        description (`str`): What it does, in words.
    """

    kind: str
    target: str
    file: str
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def apply(self, folder: str | os.PathLike, donors: Mapping[str, Path]) -> None:
        """Damages the copy of the target cache in `folder`; `donors` maps every base to its folder."""
        APPLY[self.kind](Path(folder), donors, **self.params)


def faults(seed: int, n: int, manifests: Mapping[str, dict[str, Any]]) -> list[Fault]:
    """Draws faults over the target caches.

    Args:
        seed (`int`): Seeds every choice; the same seed and manifests give the same faults.
        n (`int`): How many; the first `n` of a longer draw with the same seed are these.
        manifests (`Mapping[str, dict]`): The targets' manifests (JSON), by base name: the fields to edit, the
            shards to damage.

    Returns:
        `list[Fault]`: The faults, kinds in the weighted rotation of `KINDS`.
    """
    rng = random.Random(seed)
    streams = {kind: STREAMS[kind](random.Random(rng.random()), manifests) for kind in KINDS}
    return [next(streams[kind]) for kind in _rotation(n)]


def _rotation(n: int) -> list[str]:
    """`n` kinds in smooth weighted round-robin order: every kind within the first `sum(KINDS.values())`."""
    credit = dict.fromkeys(KINDS, 0)
    order = []
    for _ in range(n):
        for kind, weight in KINDS.items():
            credit[kind] += weight
        kind = max(credit, key=credit.get)
        credit[kind] -= sum(KINDS.values())
        order.append(kind)
    return order


def _rounds(rng: random.Random, items: list[Any], first_in_order: bool = False) -> Iterator[Any]:
    """`items` again and again, each round shuffled (the first one as given with `first_in_order`)."""
    first = True
    while True:
        batch = items[:]
        if not (first and first_in_order):
            rng.shuffle(batch)
        first = False
        yield from batch


def _by_layout(manifests: Mapping[str, dict[str, Any]], layout: str) -> list[str]:
    return sorted(name for name, manifest in manifests.items() if manifest["layout"] == layout)


def _file(rng: random.Random, manifest: dict[str, Any], file_kind: str) -> str:
    names = {"manifest": MANIFEST_NAME, "card": "README.md"}
    return rng.choice(list(manifest["shards"])) if file_kind == "shard" else names.get(file_kind, file_kind)


def _file_faults(kind: str, describe, params):
    """A stream of faults of `kind` on one file each, the file kinds in turn; `params(rng)` draws the parameters and
    `describe(file, params)` says what they do."""

    def stream(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
        for layout, file_kind in _rounds(rng, FILE_KINDS):
            target = rng.choice(_by_layout(manifests, layout))
            name = _file(rng, manifests[target], file_kind)
            drawn = {"file": name, **params(rng)}
            yield Fault(kind, target, file_kind, drawn, f"{target}: {describe(name, drawn)}")

    return stream


def _flip_params(rng: random.Random) -> dict[str, Any]:
    count = rng.randint(1, 8)
    return {
        "positions": sorted(rng.random() for _ in range(count)),
        "xors": [rng.randint(1, 255) for _ in range(count)],
    }


def _describe_flip(name: str, params: dict[str, Any]) -> str:
    where = ", ".join(f"{p:.1%}" for p in params["positions"])
    return f"flip {len(params['positions'])} byte(s) of {name} at {where}"


def _truncate_params(rng: random.Random) -> dict[str, Any]:
    return {"fraction": 0.0 if rng.random() < 0.25 else rng.random()}


def _describe_truncate(name: str, params: dict[str, Any]) -> str:
    return f"truncate {name} to {params['fraction']:.1%} of its size" if params["fraction"] else f"empty {name}"


def _renames(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
    moves = [(target, move) for target, manifest in sorted(manifests.items()) for move in renames(target, manifest)]
    for target, (name, to) in _rounds(rng, moves):
        file_kind = "shard" if name in manifests[target]["shards"] else name
        yield Fault("rename", target, file_kind, {"file": name, "to": to}, f"{target}: rename {name} to {to}")


def _extra_files(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
    for what, where in _rounds(rng, EXTRA_FILES):
        target = rng.choice(sorted(manifests))
        yield Fault("extra-file", target, "folder", {"what": what, "where": where}, f"{target}: add {what} {where}")


def field_group(path: tuple) -> str:
    """The name of the manifest field at `path`; the shards' entries are one field, `shards.<shard>`."""
    return "shards.<shard>" if path[0] == "shards" and len(path) == 2 else field_name(path)


def field_holders(manifests: Mapping[str, dict[str, Any]]) -> dict[str, list[tuple[str, tuple]]]:
    """The `(target, path)` of every manifest field of the targets, by `field_group`."""
    holders: dict[str, list[tuple[str, tuple]]] = {}
    for target, manifest in sorted(manifests.items()):
        for path in fields(manifest):
            holders.setdefault(field_group(path), []).append((target, path))
    return holders


def _manifest_fields(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
    """Every field of `field_holders` once per round (on a target that has it), the value classes in turn."""
    holders = field_holders(manifests)
    classes = _rounds(rng, list(VALUE_CLASSES))
    for name in _rounds(rng, sorted(holders)):
        target, path = rng.choice(holders[name])
        value_class, seed = next(classes), rng.randrange(2**31)
        value = bad_value(get(manifests[target], path), value_class, random.Random(seed))
        params = {"field": list(path), "value_class": value_class, "seed": seed}
        shown = reprlib.repr(value) if value_class not in ("removed", "deep-nesting") else value_class
        description = f"{target}: {field_name(path)} = {shown} ({value_class})"
        yield Fault("manifest-field", target, "manifest", params, description)


def _semantic(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
    catalogs = {target: semantic_edits(manifest) for target, manifest in sorted(manifests.items())}
    # The first round takes the targets' catalogs in turn, each from its most telling edit.
    entries = [
        (target, catalog[i])
        for i in range(max(map(len, catalogs.values())))
        for target, catalog in catalogs.items()
        if i < len(catalog)
    ]
    for target, (label, changes) in _rounds(rng, entries, first_in_order=True):
        shown = "; ".join(f"{field_name(path)} = {reprlib.repr(value)}" for path, value in changes)
        params = {"changes": [[list(path), value] for path, value in changes]}
        yield Fault("manifest-semantic", target, "manifest", params, f"{target}: {label}: {shown}")


def _swaps(rng: random.Random, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Fault]:
    for target, donor, mode in _rounds(rng, SWAPS, first_in_order=True):
        what = "its own shards" if donor == target else donor
        yield Fault("swap", target, "folder", {"donor": donor, "mode": mode}, f"{target}: {mode} from {what}")


STREAMS = {
    "byte-flip": _file_faults("byte-flip", _describe_flip, _flip_params),
    "truncate": _file_faults("truncate", _describe_truncate, _truncate_params),
    "delete": _file_faults("delete", lambda name, _: f"delete {name}", lambda rng: {}),
    "rename": _renames,
    "extra-file": _extra_files,
    "manifest-field": _manifest_fields,
    "manifest-semantic": _semantic,
    "swap": _swaps,
}
