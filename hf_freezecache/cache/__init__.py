"""Activation caches: codecs, shards on disk, and the reader that trains from them.

Data flows one way: `builder` runs the frozen prefix over images (and, for `sidecars`, over flipped or augmented
images) and encodes chunks with a `codecs` codec into `datasets` shards described by a `manifest`; `reader` verifies
and decodes them; `sampler` orders samples so each chunk is decoded once per epoch; `hub` exports a cache in the Hub
dataset-repo layout, pushes it and loads it back. The builder, the reader and the Hub export all take the row
columns from `manifest`, never from one another.
"""

from .builder import build_activation_cache, check_destination, prefix_in_eval, remove_partial_builds
from .codecs import CODECS, ActivationCodec, build_codec, register_codec
from .compatibility import check_cache_fits_model
from .hub import export_cache, load_cache, push_cache_to_hub
from .manifest import (
    CacheManifest,
    CacheMismatchError,
    CorruptCacheError,
    dataset_fingerprint,
    fingerprint_parts,
)
from .reader import ActivationCache, CachedActivationDataset
from .sampler import ChunkShuffleSampler
from .sidecars import SIDECARS, Sidecar, build_sidecar

__all__ = [
    "CODECS",
    "ActivationCache",
    "ActivationCodec",
    "CacheManifest",
    "CacheMismatchError",
    "CachedActivationDataset",
    "ChunkShuffleSampler",
    "SIDECARS",
    "Sidecar",
    "CorruptCacheError",
    "build_activation_cache",
    "build_codec",
    "build_sidecar",
    "check_cache_fits_model",
    "check_destination",
    "dataset_fingerprint",
    "export_cache",
    "fingerprint_parts",
    "load_cache",
    "prefix_in_eval",
    "push_cache_to_hub",
    "register_codec",
    "remove_partial_builds",
]
