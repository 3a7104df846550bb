"""What a cache folder holds and what it was built from, one concept per module.

- `schema`: the `CacheManifest` fields, the format version and layouts, and the columns of the rows (`cache_features`),
  which the builder, the reader and the Hub export all take from here;
- `validation`: the checks a manifest passes before anything it describes is read (it may come from the Hub);
- `card`: the dataset card (`README.md`);
- `integrity`: the shards' sha256 and `CorruptCacheError`;
- `fingerprint`: the hashes of what a cache was built from, and `CacheMismatchError` naming what differs.
"""

from .card import card_metadata, dataset_card
from .fingerprint import (
    CacheMismatchError,
    cache_fingerprint,
    dataset_fingerprint,
    describe_mismatch,
    fingerprint_parts,
    prefix_weights_hash,
)
from .integrity import CorruptCacheError, file_sha256, verify_shards
from .schema import (
    CACHE_FEATURES,
    CARD_NAME,
    EXTENSIONS,
    FORMAT_VERSION,
    LAYOUT_ARROW,
    LAYOUT_PARQUET,
    LAYOUTS,
    MANIFEST_NAME,
    CacheManifest,
    cache_features,
    row_features,
)
from .validation import (
    MAX_MANIFEST_BYTES,
    MAX_ROW_BYTES,
    MAX_SAMPLE_ELEMENTS,
    SPLIT_NAME,
    check_manifest,
    read_manifest_json,
)

__all__ = [
    "CACHE_FEATURES",
    "CARD_NAME",
    "EXTENSIONS",
    "FORMAT_VERSION",
    "LAYOUTS",
    "LAYOUT_ARROW",
    "LAYOUT_PARQUET",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_ROW_BYTES",
    "MAX_SAMPLE_ELEMENTS",
    "SPLIT_NAME",
    "CacheManifest",
    "CacheMismatchError",
    "CorruptCacheError",
    "cache_features",
    "cache_fingerprint",
    "card_metadata",
    "check_manifest",
    "dataset_card",
    "dataset_fingerprint",
    "describe_mismatch",
    "file_sha256",
    "fingerprint_parts",
    "prefix_weights_hash",
    "read_manifest_json",
    "row_features",
    "verify_shards",
]
