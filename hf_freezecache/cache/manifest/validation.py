"""Checking a manifest before anything it describes is read: a manifest is untrusted input (it may come from the Hub).

The limits below keep a corrupt or hostile manifest from making the reader allocate without bound or read outside
the cache folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from dataclasses import MISSING
from typing import Any, NoReturn

from ..codecs import build_codec
from .fingerprint import CacheMismatchError, cache_fingerprint
from .integrity import CorruptCacheError, check_seal
from .schema import EXTENSIONS, FORMAT_VERSION, LAYOUT_ARROW, LAYOUT_PARQUET, LAYOUTS, MANIFEST_NAME, CacheManifest

MAX_MANIFEST_BYTES = 16 << 20
#: Most values in one sample's activations (or one sample's sidecar array).
MAX_SAMPLE_ELEMENTS = 1 << 26
#: Most bytes one decoded row (a chunk of activations, or of one sidecar array) may take.
MAX_ROW_BYTES = 1 << 31
#: A split name `datasets` accepts (and that keeps `data/<split>-*` from matching another split's shards).
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
# What `measure_codec_error` records, which the card and `inspect` show.
_CODEC_ERROR_KEYS = {"samples", "std", "max_abs", "rms", "max_over_std", "rms_over_std", "ratio"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_SPLIT_LENGTH = 64
# Messages stay one readable line however large the hostile value they describe.
_MAX_DETAIL = 300


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else f"{text[:_MAX_DETAIL]}... ({len(text):,} characters)"


def read_manifest_json(path: str) -> Any:
    """The parsed JSON of the manifest file `path`, read only once its size is within `MAX_MANIFEST_BYTES`.

    Raises:
        CorruptCacheError: the file is missing, too large, or not JSON.
    """
    if not os.path.isfile(path):
        raise CorruptCacheError(f"{path} is missing: {os.path.dirname(path)} is not a complete activation cache.")
    size = os.path.getsize(path)
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCacheError(f"{path} has {size:,} bytes; a cache manifest has at most {MAX_MANIFEST_BYTES:,}.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise CorruptCacheError(f"{path} is not a JSON cache manifest ({type(error).__name__}).") from error


def check_manifest(data: Any, source: str = MANIFEST_NAME) -> None:
    """Checks a manifest's JSON form before anything it describes is read: it may come from anyone (the Hub).

    Every field must have its type and a sane value: positive counts, `num_chunks == ceil(num_samples /
    chunk_size)`, a `sample_shape` of 1 to 3 positive dimensions whose rows stay within `MAX_ROW_BYTES` decoded, a
    registered codec that accepts its parameters, well-formed sidecar arrays, and shard paths that stay inside the
    cache folder, each with a sha256. Then the seal (`integrity.check_seal`: no field changed since the build) and
    the fingerprint (the hash of its parts).

    Args:
        data: The parsed JSON.
        source (`str`): Where it was read from, for the messages.

    Raises:
        CacheMismatchError: the manifest is of an earlier cache format (it has no seal: rebuild the cache).
        CorruptCacheError: naming the first invalid field, its value and what is allowed, or the fields changed
            since the build.
    """

    def fail(name: str, value: Any, allowed: str) -> NoReturn:
        raise CorruptCacheError(f"{source}: invalid {name} {reprlib.repr(value)}; expected {_clip(allowed)}.")

    def integer(name: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            fail(name, value, f"an integer >= {minimum}")

    def number(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            fail(name, value, "a finite number >= 0")

    def string(name: str, value: Any, optional: bool = False) -> None:
        if not (isinstance(value, str) or (optional and value is None)):
            fail(name, value, "a string" + (" or null" if optional else ""))

    def mapping(name: str, value: Any) -> None:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            fail(name, value, "a JSON object")

    def shape(name: str, value: Any) -> int:
        if (
            not isinstance(value, list)
            or not 1 <= len(value) <= 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value)
        ):
            fail(name, value, "a list of 1 to 3 positive integers")
        if math.prod(value) > MAX_SAMPLE_ELEMENTS:
            fail(name, value, f"at most {MAX_SAMPLE_ELEMENTS:,} values per sample")
        return math.prod(value)

    mapping("manifest", data)
    required = [
        n
        for n, f in CacheManifest.__dataclass_fields__.items()
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise CorruptCacheError(f"{source}: the manifest lacks {', '.join(missing)}.")
    integer("format_version", data.get("format_version"), 1)
    if data["format_version"] > FORMAT_VERSION:
        fail("format_version", data["format_version"], f"<= {FORMAT_VERSION} (written by a newer hf_freezecache)")
    if data["format_version"] < FORMAT_VERSION:
        raise CacheMismatchError(
            f"{source}: the cache is of format {data['format_version']}, written by an earlier hf_freezecache; this "
            f"version reads format {FORMAT_VERSION} (sealed manifests). Rebuild it (a discard rebuilds it by itself)."
        )
    for name in ("fingerprint", "model_family", "model_class", "source"):
        string(name, data.get(name, ""))
    for name in ("source_model", "source_revision"):
        string(name, data.get(name), optional=True)
    if data.get("model_num_blocks") is not None:
        integer("model_num_blocks", data["model_num_blocks"], 2)
    mapping("fingerprint_parts", data["fingerprint_parts"])
    for name, value in data["fingerprint_parts"].items():
        string(f"fingerprint_parts.{name}", value)
    integer("position", data["position"], 0)
    for name in ("chunk_size", "num_samples", "num_chunks", "num_processes"):
        integer(name, data.get(name, 1), 1)
    for name in ("raw_bytes", "stored_bytes"):
        integer(name, data[name], 0)
    for name in ("build_seconds", "prefix_forward_flops_per_sample", "build_prefix_passes"):
        number(name, data.get(name, 0))
    if data["num_chunks"] != -(-data["num_samples"] // data["chunk_size"]):
        fail(
            "num_chunks",
            data["num_chunks"],
            f"ceil(num_samples / chunk_size) = {-(-data['num_samples'] // data['chunk_size'])}",
        )
    elements = shape("sample_shape", data["sample_shape"])
    if data["dtype"] != "float32":
        fail("dtype", data["dtype"], "'float32'")
    if 4 * elements * data["chunk_size"] > MAX_ROW_BYTES:
        fail("chunk_size", data["chunk_size"], f"a chunk of at most {MAX_ROW_BYTES:,} bytes decoded")
    mapping("codec", data["codec"])
    try:
        build_codec(data["codec"])
    except ValueError as error:
        detail = _clip(str(error))
        raise CorruptCacheError(f"{source}: invalid codec {reprlib.repr(data['codec'])}: {detail}") from error

    if data.get("codec_error") is not None:
        mapping("codec_error", data["codec_error"])
        if not _CODEC_ERROR_KEYS <= set(data["codec_error"]):
            fail("codec_error", data["codec_error"], f"an object with {', '.join(sorted(_CODEC_ERROR_KEYS))}")
        for name, value in data["codec_error"].items():
            number(f"codec_error.{name}", value)
    if data.get("codec_request") is not None:
        mapping("codec_request", data["codec_request"])

    mapping("sidecars", data.get("sidecars", {}))
    arrays: set[str] = set()
    for name, sidecar in data.get("sidecars", {}).items():
        mapping(f"sidecars.{name}", sidecar)
        for key in ("config", "summary", "arrays"):
            mapping(f"sidecars.{name}.{key}", sidecar.get(key))
        for array, spec in sidecar["arrays"].items():
            where = f"sidecars.{name}.arrays.{array}"
            mapping(where, spec)
            if array in arrays:
                fail(where, array, "array names unique over all sidecars")
            arrays.add(array)
            size = shape(f"{where}.shape", spec.get("shape"))
            if spec.get("dtype") not in ("float32", "int32"):
                fail(f"{where}.dtype", spec.get("dtype"), "'float32' or 'int32'")
            integer(f"{where}.stored_bytes", spec.get("stored_bytes"), 0)
            if 4 * size * data["chunk_size"] > MAX_ROW_BYTES:
                fail(f"{where}.shape", spec["shape"], f"a chunk of at most {MAX_ROW_BYTES:,} bytes decoded")

    layout = data.get("layout", LAYOUT_ARROW)
    if layout not in LAYOUTS:
        fail("layout", layout, " or ".join(map(repr, LAYOUTS)))
    split = data.get("split", "train")
    if not isinstance(split, str) or len(split) > _MAX_SPLIT_LENGTH or not SPLIT_NAME.fullmatch(split):
        fail("split", split, f"a split name of letters, digits and '_' (dot-separated), at most {_MAX_SPLIT_LENGTH}")
    shards = data.get("shards")
    if not isinstance(shards, dict) or not shards:
        fail("shards", shards, "a JSON object of at least one shard path -> sha256")
    if layout == LAYOUT_PARQUET:
        # Exactly the files `datasets` finds with the card's `data/<split>-*`, in the same (sorted) order.
        expected = [f"data/{split}-{index:05d}-of-{len(shards):05d}.parquet" for index in range(len(shards))]
        if list(shards) != expected:
            fail("shard paths", list(shards), f"{expected} (the Hub layout of split {split!r}, in order)")
    for name, digest in shards.items():
        if (
            not _SHARD_NAME.fullmatch(name)
            or {".", ".."} & set(name.split("/"))
            or not name.endswith(EXTENSIONS[layout])
        ):
            fail("shard path", name, f"a relative path inside the cache folder ending in {EXTENSIONS[layout]}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            fail(f"sha256 of {name}", digest, "64 lowercase hex digits")

    mapping("seal", data.get("seal"))
    for name, digest in data["seal"].items():
        string(f"seal.{name}", digest)
    check_seal(data, source)
    if data["fingerprint"] != cache_fingerprint(data["fingerprint_parts"]):
        fail("fingerprint", data["fingerprint"], "the hash of fingerprint_parts (they were edited)")
