"""`CacheConfig`: how activation caches are encoded, chunked, built and read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codecs import CODECS


@dataclass
class CacheConfig:
    """The options of activation caches: codec, tolerance, chunking, and the build's and reader's resources.

    `FreezeCacheArguments` exposes each field as a `--cache_<field>` flag.
    """

    codec: str = field(
        default="zfp",
        metadata={
            "help": "Codec of cached activations: 'zfp' (lossy, error <= tolerance, decoded on the host), 'lowbit' "
            "(2/4/8-bit per-channel quantisation with stochastic rounding, decoded on the training device), 'int8', "
            "'fp16', 'bf16', 'none' (raw float32)."
        },
    )
    bits: int = field(
        default=4, metadata={"help": "Bits per value of the 'lowbit' codec: 2, 4 or 8.", "choices": [2, 4, 8]}
    )
    entropy: str = field(
        default="none",
        metadata={
            "help": "Lossless coding of the 'lowbit' codec's packed bytes: 'none' (decoded on the device as stored) "
            "or 'zstd' (smaller on disk, decompressed on the host).",
            "choices": ["none", "zstd"],
        },
    )
    tolerance: float = field(
        default=0.05,
        metadata={
            "help": "zfp error tolerance, the same at every position (the paper's progressive compression). Relative "
            "to the standard deviation of the position's activations unless --cache_tolerance_relative false."
        },
    )
    tolerance_relative: bool = field(
        default=True,
        metadata={"help": "Whether --cache_tolerance is relative to the activations' std (true) or absolute (false)."},
    )
    chunk_size: int = field(
        default=4,
        metadata={"help": "Consecutive samples compressed together (one cache row); chunks are shuffled as units."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the one-off prefix pass; default per_device_eval_batch_size."},
    )
    decode_threads: int = field(
        default=2,
        metadata={
            "help": "Threads decoding the chunks of a batch (per DataLoader worker), and encoding chunks while a "
            "cache is built."
        },
    )
    max_shard_size: str = field(default="500MB", metadata={"help": "Largest Arrow shard of a cache."})
    memory: str = field(
        default="auto",
        metadata={
            "help": "Where training reads the cache from: 'device' (every row unpacked once into the training "
            "device's memory: packed codes for device-decoded codecs, float32 for zfp and none), 'host' (the stored "
            "bytes loaded once into host memory), 'disk' (memory-mapped shards, read every epoch), or 'auto' (device "
            "when that takes at most 40 percent of the free device memory, else host when it fits, else disk).",
            "choices": ["auto", "device", "host", "disk"],
        },
    )

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(
                f"--cache_codec {self.codec!r} is not a known codec; choose one of {', '.join(CODECS.names())}."
            )
        if not self.tolerance > 0:
            raise ValueError(f"--cache_tolerance must be > 0, got {self.tolerance}.")
        if self.chunk_size < 1:
            raise ValueError(f"--cache_chunk_size must be at least 1, got {self.chunk_size}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--cache_batch_size must be at least 1, got {self.batch_size}.")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"--cache_bits must be 2, 4 or 8, got {self.bits}.")
        if self.entropy not in ("none", "zstd"):
            raise ValueError(f"--cache_entropy must be 'none' or 'zstd', got {self.entropy!r}.")
        if self.memory not in ("auto", "device", "host", "disk"):
            raise ValueError(f"--cache_memory must be one of auto, device, host, disk; got {self.memory!r}.")
        if self.decode_threads < 1:
            raise ValueError(f"--cache_decode_threads must be at least 1, got {self.decode_threads}.")

    def codec_config(self) -> dict[str, Any]:
        """The requested codec as a `build_codec` config (before a relative tolerance is resolved)."""
        if self.codec == "zfp":
            return {"name": "zfp", "tolerance": self.tolerance, "relative": self.tolerance_relative}
        if self.codec == "lowbit":
            return {"name": "lowbit", "bits": self.bits, "entropy": self.entropy}
        return {"name": self.codec}
