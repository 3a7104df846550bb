"""Activation caches: codecs, shards on disk, and the reader that trains from them.

Data flows one way: `builder` runs the frozen prefix over images (and, for `sidecars`, over flipped or augmented
images) and encodes chunks with a `codecs` codec into `datasets` shards described by a `manifest`; `reader` verifies
and unpacks them; `dataset` serves their samples from disk, host memory or device memory (`memory`, `resident`) as
`packed` batches that are decoded on the training device; `sampler` orders samples so each chunk is read once per
epoch; `hub` exports a cache in the Hub dataset-repo layout, pushes it and loads it back; `store` reads and
writes caches at URLs on any fsspec store. The builder, the reader and the Hub export all take the row columns from
`manifest`, never from one another.
"""

from .builder import build_activation_cache, check_destination, prefix_in_eval, remove_partial_builds
from .codecs import CODECS, ActivationCodec, build_codec, register_codec
from .compatibility import check_cache_fits_model, check_eval_cache_matches
from .dataset import CachedActivationDataset
from .hub import export_cache, load_cache, push_cache_to_hub
from .manifest import (
    CacheManifest,
    CacheMismatchError,
    CorruptCacheError,
    dataset_fingerprint,
    fingerprint_parts,
)
from .memory import MEMORY_MODES, choose_memory
from .packed import PackedBatch, PackedSample
from .reader import ActivationCache
from .sampler import ChunkShuffleSampler
from .sidecars import SIDECARS, Sidecar, build_sidecar

__all__ = [
    "CODECS",
    "MEMORY_MODES",
    "ActivationCache",
    "ActivationCodec",
    "CacheManifest",
    "CacheMismatchError",
    "CachedActivationDataset",
    "ChunkShuffleSampler",
    "SIDECARS",
    "Sidecar",
    "CorruptCacheError",
    "PackedBatch",
    "PackedSample",
    "build_activation_cache",
    "build_codec",
    "build_sidecar",
    "check_cache_fits_model",
    "check_eval_cache_matches",
    "check_destination",
    "choose_memory",
    "dataset_fingerprint",
    "export_cache",
    "fingerprint_parts",
    "load_cache",
    "prefix_in_eval",
    "push_cache_to_hub",
    "register_codec",
    "remove_partial_builds",
]
