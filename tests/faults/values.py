"""What the manifest faults write: the fields of a manifest, and a wrong value of each class for any of them.

A field is a path into the manifest's JSON (`("codec", "tolerance")`, `("sample_shape", 0)`). `bad_value` derives
the value from the field's current one, so the same class gives a well-typed wrong value for an int, a string or a
list alike.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

#: Value classes of the manifest-field faults, each applicable to any field.
VALUE_CLASSES = (
    "wrong",  # same type, another plausible value
    "huge",
    "negative",
    "wrong-type",
    "long-string",
    "path-traversal",
    "nan",
    "inf",
    "deep-nesting",
    "null",
    "removed",
)
#: Stands for a value too deeply nested for `json.dumps` to write; `write_manifest` puts the raw text in its place.
DEEP = "__deeply_nested__"
DEEP_TEXT = "[" * 100_000 + "]" * 100_000
# Lists longer than this are edited whole (the per-channel SSIM), not element by element.
_ELEMENT_LISTS = 4

Path = tuple[str | int, ...]


def fields(manifest: dict[str, Any], depth: int = 5) -> list[Path]:
    """Every field of `manifest` down to `depth` levels: each key of each object, and each element of short lists."""
    found: list[Path] = []

    def walk(value: Any, path: Path) -> None:
        if path:
            found.append(path)
        if len(path) >= depth:
            return
        if isinstance(value, dict):
            for key in value:
                walk(value[key], (*path, key))
        elif isinstance(value, list) and len(value) <= _ELEMENT_LISTS:
            for index, item in enumerate(value):
                walk(item, (*path, index))

    walk(manifest, ())
    return found


def field_name(path: Path) -> str:
    """`sidecars.channel-flip.summary.channels[2]`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def get(manifest: Any, path: Path) -> Any:
    for part in path:
        manifest = manifest[part]
    return manifest


#: The value of the class `removed`: `put` deletes the field.
REMOVED = object()


def put(manifest: Any, path: Path, value: Any) -> None:
    """Sets the field at `path`; the class `removed` (`value is REMOVED`) deletes it (a list element: pops it)."""
    parent = get(manifest, path[:-1])
    if value is REMOVED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def bad_value(value: Any, value_class: str, rng: random.Random) -> Any:
    """A value of `value_class` to replace `value` with (`REMOVED` to delete the field, `DEEP` for deep nesting)."""
    if value_class == "wrong":
        return _wrong(value, rng)
    if value_class == "huge":
        return _huge(value)
    if value_class == "negative":
        if isinstance(value, list) and value and _is_number(value[0]):
            return [-value[0] - 1, *value[1:]]
        return -abs(value) - 1 if _is_number(value) else -1
    if value_class == "wrong-type":
        return _wrong_type(value)
    if value_class == "long-string":
        return "A" * 1_000_000
    if value_class == "path-traversal":
        return ["../../../etc/passwd"] if isinstance(value, list) else "../../../etc/passwd"
    if value_class == "nan":
        return [math.nan] * len(value) if isinstance(value, list) and value else math.nan
    if value_class == "inf":
        return math.inf
    if value_class == "deep-nesting":
        return DEEP
    if value_class == "null":
        return None
    if value_class == "removed":
        return REMOVED
    raise ValueError(f"unknown value class {value_class!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wrong(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1, 2, 8]) if value > 1 else value + rng.choice([1, 2])
    if isinstance(value, float):
        return value * rng.choice([0.5, 2.0, 1.0 + 1e-9]) if value else 1.0
    if isinstance(value, str):
        if value and all(c in "0123456789abcdef" for c in value):
            return "".join(rng.choice("0123456789abcdef") for _ in value)  # another hash of the same length
        return rng.choice(["other", value.upper() if value != value.upper() else value.lower(), value + "x"])
    if isinstance(value, list):
        if len(value) > 1 and len(set(map(json.dumps, value))) > 1:
            shuffled = value[:]
            while shuffled == value:
                rng.shuffle(shuffled)
            return shuffled
        return [*value, value[0]] if value else [1]
    if isinstance(value, dict):
        if value:
            key = rng.choice(sorted(value))
            return {k: v for k, v in value.items() if k != key}
        return {"unexpected": 1}
    return "resnet56"  # null: a plausible string


def _huge(value: Any) -> Any:
    if isinstance(value, float):
        return 1e308
    if isinstance(value, str):
        return "9" * 4096
    if isinstance(value, list):
        return [2**62] * max(1, len(value))
    if isinstance(value, dict):
        return {f"key{i}": i for i in range(100_000)}
    return 2**63  # ints, bools, null


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "true"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return {str(i): item for i, item in enumerate(value)}
    if isinstance(value, dict):
        return list(value.items())
    return {"unexpected": True}


def dumps(manifest: dict[str, Any]) -> str:
    """The manifest's JSON text, with `DEEP` replaced by a list nested 100,000 deep (and NaN/inf as JSON allows)."""
    return json.dumps(manifest, indent=2).replace(json.dumps(DEEP), DEEP_TEXT)
