"""What each kind of fault does to a copy of a cache (`APPLY`, by kind), and reading and writing its manifest."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_freezecache.cache.manifest import MANIFEST_NAME, CacheManifest, file_sha256

from .values import bad_value, dumps, get, put


def read_manifest(folder: Path) -> dict[str, Any]:
    """The JSON of the manifest in `folder`."""
    return json.loads((folder / MANIFEST_NAME).read_text())


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Writes `manifest` into `folder` (with `values.dumps`: NaN, infinities and deep nesting as given)."""
    (folder / MANIFEST_NAME).write_text(dumps(manifest))


def resealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` as the library writes it from these fields: every derived field (e.g. a seal) consistent again."""
    known = CacheManifest.__dataclass_fields__
    return CacheManifest(**{k: v for k, v in manifest.items() if k in known and k != "seal"}).to_dict()


def _apply_flip(folder: Path, donors: Mapping[str, Path], file: str, positions: list[float], xors: list[int]) -> None:
    data = bytearray((folder / file).read_bytes())
    for position, xor in zip(positions, xors, strict=True):
        if data:
            data[int(position * len(data))] ^= xor
    (folder / file).write_bytes(bytes(data))


def _apply_truncate(folder: Path, donors: Mapping[str, Path], file: str, fraction: float) -> None:
    os.truncate(folder / file, int(fraction * (folder / file).stat().st_size))


def _apply_delete(folder: Path, donors: Mapping[str, Path], file: str) -> None:
    path = folder / file
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_rename(folder: Path, donors: Mapping[str, Path], file: str, to: str) -> None:
    source, destination = folder / file, folder / to
    if destination.exists():  # another shard's name: the two exchange names
        os.rename(destination, folder / "exchange.tmp")
        os.rename(source, destination)
        os.rename(folder / "exchange.tmp", source)
    else:
        os.rename(source, destination)


def _apply_extra(folder: Path, donors: Mapping[str, Path], what: str, where: str) -> None:
    first = next(iter(read_manifest(folder)["shards"]))
    if where == "{parent}":
        path = folder.parent / f"{folder.name}.partial-0123456789ab" / "cache"
    else:
        path = folder / where.replace("{shard}", first)
    path.parent.mkdir(parents=True, exist_ok=True)
    if what == "junk":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif what == "copy-of-shard":
        shutil.copyfile(folder / first, path)
    elif what == "pickle":
        path.write_bytes(pickle.dumps({"payload": "never unpickle me"}))
    elif what == "manifest-copy":
        shutil.copyfile(folder / MANIFEST_NAME, path)
    elif what == "partial-build":  # what an interrupted build of this folder leaves beside it
        path.mkdir()
        shutil.copyfile(folder / MANIFEST_NAME, path / MANIFEST_NAME)
    elif what == "symlink":
        os.symlink("/etc/passwd", path)
    elif what == "sparse-1GiB":
        with open(path, "wb") as f:
            f.truncate(1 << 30)
    else:
        raise ValueError(f"unknown extra file {what!r}")


def _apply_field(folder: Path, donors: Mapping[str, Path], field: list, value_class: str, seed: int) -> None:
    manifest, path = read_manifest(folder), tuple(field)
    if path[0] == "shards" and len(path) == 2 and value_class == "path-traversal":
        # A real escape: the shard sits beside the folder, and the manifest points there.
        outside = folder.parent / Path(path[1]).name
        shutil.copyfile(folder / path[1], outside)
        manifest["shards"] = {("../" + outside.name if k == path[1] else k): v for k, v in manifest["shards"].items()}
    else:
        put(manifest, path, bad_value(get(manifest, path), value_class, random.Random(seed)))
    write_manifest(folder, manifest)


def _apply_semantic(folder: Path, donors: Mapping[str, Path], changes: list) -> None:
    manifest = read_manifest(folder)
    for path, value in changes:
        put(manifest, tuple(path), value)
    write_manifest(folder, manifest)


def _apply_swap(folder: Path, donors: Mapping[str, Path], donor: str, mode: str) -> None:
    source, manifest = donors[donor], read_manifest(folder)
    theirs = read_manifest(source)
    what, _, recompute = mode.partition("+")
    if what == "cache":
        shutil.rmtree(folder)
        shutil.copytree(source, folder)
        edited = {**theirs, **{k: manifest[k] for k in ("fingerprint", "fingerprint_parts")}}
    elif what == "shards":
        for name in manifest["shards"]:
            (folder / name).unlink()
        for name in theirs["shards"]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, folder / name)
        edited = {**manifest, "shards": theirs["shards"]}
    elif what == "manifest":
        edited = {**theirs, "shards": manifest["shards"]}
        if not recompute:
            write_manifest(folder, theirs)
    elif what == "shard-exchange":
        first, last = list(manifest["shards"])[0], list(manifest["shards"])[-1]
        _apply_rename(folder, donors, first, last)
        edited = {**manifest, "shards": {**manifest["shards"], **{n: file_sha256(folder / n) for n in (first, last)}}}
    else:
        raise ValueError(f"unknown swap mode {mode!r}")
    if recompute:
        write_manifest(folder, resealed(edited) if recompute.endswith("reseal") else edited)


APPLY = {
    "byte-flip": _apply_flip,
    "truncate": _apply_truncate,
    "delete": _apply_delete,
    "rename": _apply_rename,
    "extra-file": _apply_extra,
    "manifest-field": _apply_field,
    "manifest-semantic": _apply_semantic,
    "swap": _apply_swap,
}
