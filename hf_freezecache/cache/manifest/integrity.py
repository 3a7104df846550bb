"""What makes a cache's files trustworthy together: the shards' sha256, the manifest's seal, and the binding of every
shard to the manifest's fingerprint.

- Every shard's sha256 is in the manifest (`shards`): a truncated, altered or swapped shard is refused.
- The manifest's `seal` holds a digest of every other field, so a field edited after the build is refused and named
  (the channel list of a sidecar, a codec parameter, a shape...), and a field removed or added is noticed.
- Every shard carries the cache's fingerprint in its Arrow schema metadata (`bind_schema`): a shard moved in from
  another cache is refused even when its sha256 was recomputed into this manifest and the seal resealed.

None of this is a signature: someone who rewrites every derived field (the shard checksums, the seal, and the
fingerprint and its parts to match the shard's binding) can forge a consistent cache. It protects against corruption,
mix-ups and edits, not against a deliberate forger; trust a downloaded cache as much as its source (pin a Hub
revision).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa

from .schema import MANIFEST_NAME, CacheManifest

#: The key of the Arrow schema metadata that binds a shard to its cache.
BINDING_KEY = b"hf_freezecache"


class CorruptCacheError(OSError):
    """A cache file is missing, truncated or altered (its checksum does not match the manifest)."""


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """sha256 of the file at `path` (hex), read `block_size` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(folder: str | os.PathLike, manifest: CacheManifest) -> None:
    """Checks every data file of the cache against the manifest; raises `CorruptCacheError` naming the file."""
    for name, expected in manifest.shards.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CorruptCacheError(f"Cache shard {path} is missing.")
        if file_sha256(path) != expected:
            raise CorruptCacheError(
                f"Cache shard {path} does not match its checksum in {MANIFEST_NAME}: it was truncated or altered. "
                "Delete the cache folder to rebuild (or download) it."
            )


def sealed_fields() -> list[str]:
    """The manifest fields the seal covers: all of them but the seal."""
    return [name for name in CacheManifest.__dataclass_fields__ if name != "seal"]


def field_digest(name: str, value: Any) -> str:
    """The seal's digest of field `name` holding `value` (its JSON form, keys sorted): 16 hex digits."""
    text = json.dumps([name, value], sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_seal(data: dict[str, Any]) -> dict[str, str]:
    """The seal of a manifest's JSON form `data`: the digest of every sealed field, by name."""
    return {name: field_digest(name, data.get(name)) for name in sealed_fields()}


def check_seal(data: dict[str, Any], source: str = MANIFEST_NAME) -> None:
    """Refuses a manifest whose fields are not the ones it was sealed with, naming the fields that differ.

    Call it once the manifest's types are checked (`check_manifest`): `data["seal"]` is then a mapping of strings.

    Raises:
        CorruptCacheError: a field was edited, removed or added after the build, or the seal does not cover the
            fields this version seals.
    """
    seal = data["seal"]
    expected = sealed_fields()
    unsealed = sorted(set(expected) - set(seal))
    if unsealed:
        raise CorruptCacheError(
            f"{source}: the seal does not cover {', '.join(unsealed)}; the manifest was altered after the build. "
            "Rebuild (or download again) the cache."
        )
    changed = [name for name in expected if seal[name] != field_digest(name, data.get(name))]
    if changed:
        raise CorruptCacheError(
            f"{source}: {', '.join(changed)} changed after the cache was built (it does not match the manifest's "
            "seal); the cache is refused. Rebuild (or download again) the cache."
        )


def bind_schema(schema: pa.Schema, fingerprint: str) -> pa.Schema:
    """`schema` with the cache's `fingerprint` in its metadata, for the shards of that cache."""
    return schema.with_metadata({**(schema.metadata or {}), BINDING_KEY: json.dumps({"fingerprint": fingerprint})})


def check_binding(path: str, schema: pa.Schema, fingerprint: str) -> None:
    """Refuses a shard (with Arrow schema `schema`) that is not bound to the cache with `fingerprint`.

    Raises:
        CorruptCacheError: the shard has no binding, an unreadable one, or another cache's fingerprint.
    """
    raw = (schema.metadata or {}).get(BINDING_KEY)
    try:
        found = json.loads(raw)["fingerprint"] if raw is not None else None
    except (ValueError, TypeError, KeyError):
        found = "unreadable"
    if found != fingerprint:
        what = "no cache binding" if found is None else f"the binding of another cache ({str(found)[:40]!r})"
        raise CorruptCacheError(
            f"Cache shard {path} has {what}, not this cache's fingerprint {fingerprint}: it was moved in from "
            "another cache or written by something else. Rebuild (or download again) the cache."
        )
