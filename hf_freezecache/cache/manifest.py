"""What a cache folder holds and what it was built from: the manifest, its fingerprint, checksums, dataset card."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from torch import nn

from ..models import BlockAdapter
from .codecs import build_codec

MANIFEST_NAME = "freezecache_manifest.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

#: `Dataset.save_to_disk` Arrow shards, as `build_activation_cache` writes them.
LAYOUT_ARROW = "arrow"
#: A Hub dataset repo: `data/<split>-NNNNN-of-NNNNN.parquet`, loadable with `datasets.load_dataset`.
LAYOUT_PARQUET = "parquet"
LAYOUTS = (LAYOUT_ARROW, LAYOUT_PARQUET)
EXTENSIONS = {LAYOUT_ARROW: ".arrow", LAYOUT_PARQUET: ".parquet"}

# Limits a manifest must respect before anything it describes is read: a manifest is untrusted input (it may come
# from the Hub), and these keep a corrupt or hostile one from making the reader allocate without bound.
MAX_MANIFEST_BYTES = 16 << 20
#: Most values in one sample's activations (or one sample's sidecar array).
MAX_SAMPLE_ELEMENTS = 1 << 26
#: Most bytes one decoded row (a chunk of activations, or of one sidecar array) may take.
MAX_ROW_BYTES = 1 << 31
#: A split name `datasets` accepts (and that keeps `data/<split>-*` from matching another split's shards).
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CacheMismatchError(ValueError):
    """A cache exists but was built for another model, position, dataset or codec configuration."""


class CorruptCacheError(OSError):
    """A cache file is missing, truncated or altered (its checksum does not match the manifest)."""


@dataclass
class CacheManifest:
    """Everything needed to trust, read and describe an activation cache.

    Args:
        fingerprint (`str`): Hash of `fingerprint_parts`; a cache is used only when this matches.
        fingerprint_parts (`dict[str, str]`): Hashes of what the cache depends on (prefix weights, position, dataset
            and preprocessing, codec, chunk size, layout), kept separately so a mismatch can say what differs.
        model_family, model_class (`str`): The block adapter family and the model's class.
        position (`int`): Block position of the activations (after blocks `0..position-1`).
        sample_shape (`list[int]`): Shape of one sample's activations.
        dtype (`str`): Their dtype before encoding.
        codec (`dict`): The codec's resolved configuration (`ActivationCodec.config()`).
        chunk_size (`int`): Consecutive samples per row.
        num_samples, num_chunks (`int`): Samples and rows.
        raw_bytes, stored_bytes (`int`): Activations before and after encoding.
        build_seconds (`float`): Time to run the prefix and write the cache.
        prefix_forward_flops_per_sample (`float`): FLOPs of one sample's pass through the prefix.
        build_prefix_passes (`float`): Prefix passes per sample the build ran: 1, plus the sidecars' passes over
            flipped or augmented views and their calibration (so the build cost `prefix_forward_flops_per_sample *
            num_samples * build_prefix_passes` FLOPs).
        source (`str`): What the prefix ran on (`"images"`).
        shards (`dict[str, str]`): sha256 of every data file, by path relative to the cache folder (posix), in row
            order: the rows are the shards' rows one shard after the other.
        sidecars (`dict`): Per sidecar name (`cache.sidecars`): its `config`, the `summary` of its calibration
            (e.g. selected channels and their SSIM), and its `arrays` (per-sample `shape`, `dtype`,
            `stored_bytes`), stored in the `sidecar.<array>` columns.
        source_model (`str`, *optional*): What the prefix came from: a Hub model id or folder, a timm name, or a
            CIFAR ResNet name (`models.model_source`).
        source_revision (`str`, *optional*): The source's revision (Hub commit), when known.
        num_processes (`int`): Processes that built the cache together (each wrote its own shards).
        model_num_blocks (`int`, *optional*): Blocks of the source model, so a suffix of another depth is refused.
        layout (`str`): How the shards are stored: `"arrow"` (`Dataset.save_to_disk`, as built) or `"parquet"`
            (the Hub dataset-repo layout written by `export_cache`).
        split (`str`): The split the rows are published as in the Hub layout (`data/<split>-*.parquet`).
        format_version (`int`): Version of the cache format.
    """

    fingerprint: str
    fingerprint_parts: dict[str, str]
    model_family: str
    model_class: str
    position: int
    sample_shape: list[int]
    dtype: str
    codec: dict[str, Any]
    chunk_size: int
    num_samples: int
    num_chunks: int
    raw_bytes: int
    stored_bytes: int
    build_seconds: float
    prefix_forward_flops_per_sample: float
    build_prefix_passes: float = 1.0
    source: str = "images"
    shards: dict[str, str] = field(default_factory=dict)
    sidecars: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_model: str | None = None
    source_revision: str | None = None
    num_processes: int = 1
    model_num_blocks: int | None = None
    layout: str = LAYOUT_ARROW
    split: str = "train"
    format_version: int = FORMAT_VERSION

    @property
    def compression_ratio(self) -> float:
        """Raw bytes / stored bytes."""
        return self.raw_bytes / max(self.stored_bytes, 1)

    @property
    def sidecar_arrays(self) -> dict[str, dict[str, Any]]:
        """Every sidecar array (`shape`, `dtype`, `stored_bytes`) by array name, over all sidecars."""
        return {name: spec for sidecar in self.sidecars.values() for name, spec in sidecar["arrays"].items()}

    @property
    def sidecar_bytes(self) -> int:
        """Stored bytes of all sidecar arrays."""
        return sum(spec["stored_bytes"] for spec in self.sidecar_arrays.values())

    @property
    def sidecar_fraction(self) -> float:
        """Sidecar bytes as a fraction of the stored activations: the storage cost of the augmentation."""
        return self.sidecar_bytes / max(self.stored_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression_ratio": self.compression_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> CacheManifest:
        """Builds a manifest from its JSON form once `check_manifest` accepts it; unknown keys are ignored.

        Raises:
            CorruptCacheError: a field is missing, of the wrong type or out of range (named, with what is allowed).
        """
        check_manifest(data, source)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the manifest and the dataset card into `folder`."""
        with open(os.path.join(folder, MANIFEST_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with open(os.path.join(folder, CARD_NAME), "w") as f:
            f.write(self.dataset_card())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CacheManifest:
        """Reads the manifest of the cache in `folder` and checks it (`check_manifest`).

        Raises:
            FileNotFoundError: `folder` does not exist.
            CorruptCacheError: the manifest is missing, too large, not JSON, or invalid (the message names the field).
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No activation cache at {folder}: no such folder.")
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise CorruptCacheError(f"{path} is missing: {folder} is not a complete activation cache.")
        size = os.path.getsize(path)
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCacheError(f"{path} has {size:,} bytes; a cache manifest has at most {MAX_MANIFEST_BYTES:,}.")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise CorruptCacheError(f"{path} is not a JSON cache manifest ({error}).") from error
        return cls.from_dict(data, source=path)

    def card_metadata(self) -> dict[str, Any]:
        """The `hf_freezecache` mapping of the card's YAML header: what the cache holds and how to decode it."""
        metadata = {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "source_model": self.source_model,
            "source_revision": self.source_revision,
            "model_family": self.model_family,
            "model_class": self.model_class,
            "model_num_blocks": self.model_num_blocks,
            "position": self.position,
            "activation_shape": self.sample_shape,
            "activation_dtype": self.dtype,
            "codec": self.codec,
            "chunk_size": self.chunk_size,
            "num_samples": self.num_samples,
            "num_rows": self.num_chunks,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "compression_ratio": self.compression_ratio,
            "sidecars": {
                name: {
                    "config": sidecar["config"],
                    "arrays": {
                        array: {"shape": spec["shape"], "dtype": spec["dtype"]}
                        for array, spec in sidecar["arrays"].items()
                    },
                }
                for name, sidecar in self.sidecars.items()
            },
            "layout": self.layout,
        }
        # Through JSON like the manifest itself: tuples become lists, so YAML only ever sees plain types.
        return json.loads(json.dumps(metadata))

    def dataset_card(self) -> str:
        """The cache's dataset card (`README.md`), for either layout: YAML metadata, then the same in words.

        The YAML header has the card `tags`, the `hf_freezecache` mapping (`card_metadata`) and, in the Hub layout,
        the `configs` that point `datasets.load_dataset` at the parquet shards.
        """
        title = f"Activation cache: {self.model_class} ({self.model_family}) at block position {self.position}"
        header: dict[str, Any] = {"pretty_name": title, "tags": ["hf_freezecache", "activation-cache"]}
        if self.layout == LAYOUT_PARQUET:
            data_files = [{"split": self.split, "path": f"data/{self.split}-*"}]
            header["configs"] = [{"config_name": "default", "data_files": data_files}]
        header["hf_freezecache"] = self.card_metadata()
        codec = ", ".join(f"{k}={v}" for k, v in self.codec.items() if k != "name")
        source = f"`{self.source_model}`" if self.source_model else "not recorded"
        if self.source_revision:
            source += f" (revision `{self.source_revision}`)"
        if self.layout == LAYOUT_PARQUET:
            where, layout = "<namespace>/<repo>", f"parquet shards `data/{self.split}-*`"
            rows = f'`datasets.load_dataset("<namespace>/<repo>", split="{self.split}")`'
        else:
            where, layout = "path/to/this/folder", "Arrow shards written by `datasets.Dataset.save_to_disk`"
            rows = "`datasets.load_from_disk(folder)`"
        return (
            f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
            f"# {title}\n\n"
            f"Outputs of the frozen prefix (the stem and blocks 0 to {self.position - 1}) of a {self.model_class}, "
            "compressed and written by hf_freezecache so that training can continue on the remaining blocks without "
            "running the prefix again.\n\n"
            "| field | value |\n|---|---|\n"
            f"| source model | {source} |\n"
            f"| fingerprint | `{self.fingerprint}` |\n"
            f"| samples / rows | {self.num_samples} / {self.num_chunks} (chunks of {self.chunk_size}) |\n"
            f"| activation shape per sample | {tuple(self.sample_shape)} {self.dtype} |\n"
            f"| codec | {self.codec['name']} ({codec or 'no parameters'}) |\n"
            f"| raw / stored bytes | {self.raw_bytes:,} / {self.stored_bytes:,} |\n"
            f"| compression ratio | {self.compression_ratio:.2f}x |\n"
            f"| build time | {self.build_seconds:.1f} s on {self.num_processes} process"
            f"{'es' if self.num_processes > 1 else ''} |\n"
            f"| built from | {self.source} |\n"
            f"| layout | {layout} (format version {self.format_version}) |\n"
            f"{self._sidecar_card_rows()}\n"
            "Each row holds `data` (the encoded activations of `len(indices)` consecutive samples, shape "
            "`(len(indices), *sample_shape)`), `labels` and `indices` (row numbers in the training split)"
            f"{self._sidecar_card_columns()}.\n\n"
            "## Loading\n\n"
            "```python\n"
            "from hf_freezecache import load_cache\n\n"
            f'cache = load_cache("{where}")  # checked (manifest, checksums, columns) before decoding\n'
            "chunk = cache.decode(0)  # float32 activations of the first row's samples\n"
            "```\n\n"
            f"The rows as they are stored: {rows}.\n\n"
            "## Training the rest of the model from it\n\n"
            f"Build the same {self.model_class} (its blocks from position {self.position} on are trained; the prefix "
            "is not needed), then feed it the cached activations:\n\n"
            "```python\n"
            "import torch\n"
            "from torch.utils.data import DataLoader\n"
            "from hf_freezecache import get_block_adapter\n"
            "from hf_freezecache.cache import CachedActivationDataset, ChunkShuffleSampler\n\n"
            "adapter = get_block_adapter(model)\n"
            "dataset = CachedActivationDataset(cache)\n"
            "loader = DataLoader(dataset, batch_size=128, sampler=ChunkShuffleSampler(dataset, 128))\n"
            "for batch in loader:\n"
            f'    logits = adapter.suffix(batch["prefix_activations"], {self.position})\n'
            '    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])\n'
            "    ...\n"
            "```\n"
        )

    def _sidecar_card_rows(self) -> str:
        rows = ""
        for name, sidecar in self.sidecars.items():
            options = ", ".join(f"{k}={v}" for k, v in sidecar["config"].items())
            stored = sum(spec["stored_bytes"] for spec in sidecar["arrays"].values())
            rows += f"| sidecar | {name} ({options}): {stored:,} bytes |\n"
            if "channels" in sidecar["summary"]:
                rows += f"| flip-sensitive channels | {sidecar['summary']['channels']} |\n"
        if self.sidecars:
            rows += f"| sidecars / cache | {self.sidecar_fraction:.1%} |\n"
        return rows

    def _sidecar_card_columns(self) -> str:
        if not self.sidecars:
            return ""
        columns = ", ".join(
            f"`sidecar.{name}` (shape `(len(indices), {', '.join(map(str, spec['shape']))})`, {spec['dtype']})"
            for name, spec in self.sidecar_arrays.items()
        )
        return f", and the augmentation sidecars {columns}; float32 arrays use the same codec as `data`"


def check_manifest(data: Any, source: str = MANIFEST_NAME) -> None:
    """Checks a manifest's JSON form before anything it describes is read: it may come from anyone (the Hub).

    Every field must have its type and a sane value: positive counts, `num_chunks == ceil(num_samples /
    chunk_size)`, a `sample_shape` of 1 to 3 positive dimensions whose rows stay within `MAX_ROW_BYTES` decoded, a
    registered codec that accepts its parameters, well-formed sidecar arrays, and shard paths that stay inside the
    cache folder, each with a sha256.

    Args:
        data: The parsed JSON.
        source (`str`): Where it was read from, for the messages.

    Raises:
        CorruptCacheError: naming the first invalid field, its value and what is allowed.
    """

    def fail(name: str, value: Any, allowed: str) -> NoReturn:
        raise CorruptCacheError(f"{source}: invalid {name} {reprlib.repr(value)}; expected {allowed}.")

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
    integer("format_version", data.get("format_version", FORMAT_VERSION), 1)
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        fail("format_version", data["format_version"], f"<= {FORMAT_VERSION} (written by a newer hf_freezecache)")
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
        raise CorruptCacheError(f"{source}: invalid codec {reprlib.repr(data['codec'])}: {error}") from error

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
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        fail("split", split, "a split name of letters, digits and '_' (dot-separated)")
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


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
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


def _hash(*items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def prefix_weights_hash(adapter: BlockAdapter, position: int) -> str:
    """sha256 of the parameters and buffers of the stem and blocks `0..position-1` (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    names = {id(t): n for n, t in [*adapter.model.named_parameters(), *adapter.model.named_buffers()]}
    seen: set[int] = set()
    for index in range(position):
        modules: list[nn.Module] = adapter.block_modules(index)
        tensors = adapter.block_parameters(index) + [b for m in modules for b in m.buffers()]
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            data = tensor.detach().to("cpu", copy=False).contiguous()
            digest.update(f"{names.get(id(tensor), '?')}|{tuple(data.shape)}|{data.dtype}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset, probes: int = 8) -> str:
    """Identifies a training dataset and its preprocessing.

    Combines the `datasets` fingerprint (when the dataset has one), its length, and a hash of a few preprocessed
    items spread over the dataset: a different split, subset, image size or normalisation changes it.
    """
    n = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}|{n}|{getattr(dataset, '_fingerprint', '')}".encode())
    for index in np.linspace(0, n - 1, num=min(probes, n), dtype=np.int64):
        item = dataset[int(index)]
        for key in sorted(item):
            value = item[key]
            value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            digest.update(f"{key}|{value.shape}|{value.dtype}|".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def cache_fingerprint(parts: dict[str, str]) -> str:
    return _hash(parts)[:32]


def fingerprint_parts(
    adapter: BlockAdapter,
    position: int,
    dataset_hash: str,
    codec_config: dict[str, Any],
    chunk_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The components of a cache's fingerprint, each hashed on its own."""
    return {
        "model": _hash(adapter.family, type(adapter.model).__name__),
        "prefix_weights": prefix_weights_hash(adapter, position),
        "position": str(position),
        "dataset": dataset_hash,
        "codec": _hash(codec_config),
        "chunk_size": str(chunk_size),
        "format": str(FORMAT_VERSION),
        **({"extra": _hash(extra)} if extra else {}),
    }


def describe_mismatch(expected: dict[str, str], found: dict[str, str]) -> str:
    """Names the fingerprint components that differ, in words."""
    words = {
        "model": "model family/class",
        "prefix_weights": "prefix weights",
        "position": "block position",
        "dataset": "dataset or preprocessing",
        "codec": "codec configuration",
        "chunk_size": "chunk size",
        "format": "cache format version",
        "extra": "sidecar configuration",
    }
    differing = [words.get(k, k) for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    return ", ".join(differing) or "nothing (fingerprint algorithm changed)"
