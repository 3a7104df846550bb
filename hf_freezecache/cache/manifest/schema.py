"""What a cache folder holds: the manifest's fields, the format version and layouts, and the columns of its rows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from ..sidecars import SIDECAR_COLUMN_PREFIX

MANIFEST_NAME = "freezecache_manifest.json"
CARD_NAME = "README.md"
#: 2: the manifest is sealed and the shards are bound to its fingerprint (`integrity`).
FORMAT_VERSION = 2

#: Arrow shards in `Dataset.save_to_disk`'s layout, as `build_activation_cache` writes them.
LAYOUT_ARROW = "arrow"
#: A Hub dataset repo: `data/<split>-NNNNN-of-NNNNN.parquet`, loadable with `datasets.load_dataset`.
LAYOUT_PARQUET = "parquet"
LAYOUTS = (LAYOUT_ARROW, LAYOUT_PARQUET)
EXTENSIONS = {LAYOUT_ARROW: ".arrow", LAYOUT_PARQUET: ".parquet"}

#: Rows of a cache: one per chunk of consecutive samples.
CACHE_FEATURES = datasets.Features(
    {
        "data": datasets.Value("binary"),
        "labels": datasets.List(datasets.Value("int64")),
        "indices": datasets.List(datasets.Value("int64")),
    }
)


def row_features(sidecar_arrays: Iterable[str]) -> datasets.Features:
    """The columns of a cache's rows: `data`, `labels`, `indices`, then `sidecar.<name>` per sidecar array."""
    return datasets.Features(
        {**CACHE_FEATURES, **{SIDECAR_COLUMN_PREFIX + name: datasets.Value("binary") for name in sidecar_arrays}}
    )


def cache_features(manifest: CacheManifest) -> datasets.Features:
    """The columns of the rows of the cache `manifest` describes (`row_features` of its sidecar arrays)."""
    return row_features(manifest.sidecar_arrays)


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
        codec_error (`dict`, *optional*): The codec's error measured on the first samples at build time (`samples`,
            the activations' `std`, `max_abs` and `rms` error, both over `std`, and the `ratio` there).
        codec_request (`dict`, *optional*): The codec as requested, before it was resolved on the first samples (a
            relative zfp tolerance, a `budget`).
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
        layout (`str`): How the shards are stored: `"arrow"` (`Dataset.save_to_disk`'s layout, as built) or `"parquet"`
            (the Hub dataset-repo layout written by `export_cache`).
        split (`str`): The split the rows are published as in the Hub layout (`data/<split>-*.parquet`).
        format_version (`int`): Version of the cache format.
        seal (`dict[str, str]`, *optional*): A digest of every other field (`integrity.manifest_seal`), written by
            `to_dict`; a manifest whose fields do not match it is refused when loaded.
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
    codec_error: dict[str, float] | None = None
    codec_request: dict[str, Any] | None = None
    layout: str = LAYOUT_ARROW
    split: str = "train"
    format_version: int = FORMAT_VERSION
    seal: dict[str, str] | None = None

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
        """The manifest's JSON form, sealed: `seal` holds the digest of every other field as they are now."""
        from .integrity import manifest_seal

        data = asdict(self)
        data["seal"] = manifest_seal(data)
        return {**data, "compression_ratio": self.compression_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> CacheManifest:
        """Builds a manifest from its JSON form once `check_manifest` accepts it; unknown keys are ignored.

        Raises:
            CacheMismatchError: the manifest is of an earlier cache format (such a cache is rebuilt, not read).
            CorruptCacheError: a field is missing, of the wrong type or out of range, or was changed after the
                build (named, with what is allowed).
        """
        # Imported here: the validation and the card build on this schema, which imports nothing of theirs.
        from .validation import check_manifest

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
        from .validation import read_manifest_json

        return cls.from_dict(read_manifest_json(path), source=path)

    def card_metadata(self) -> dict[str, Any]:
        """The `hf_freezecache` mapping of the card's YAML header: what the cache holds and how to decode it."""
        from .card import card_metadata

        return card_metadata(self)

    def dataset_card(self) -> str:
        """The cache's dataset card (`README.md`), for either layout: YAML metadata, then the same in words.

        The YAML header has the card `tags`, the `hf_freezecache` mapping (`card_metadata`) and, in the Hub layout,
        the `configs` that point `datasets.load_dataset` at the parquet shards.
        """
        from .card import dataset_card

        return dataset_card(self)
