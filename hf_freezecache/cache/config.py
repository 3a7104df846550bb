"""`CacheConfig`: how activation caches are encoded, chunked, built and read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .codecs import CODECS, build_codec


@dataclass
class CacheConfig:
    """The options of activation caches: codec, tolerance, chunking, and the build's and reader's resources.

    `FreezeCacheArguments` exposes each field as a `--cache_<field>` flag.
    """

    codec: str = field(
        default="codebook",
        metadata={
            "help": "Codec of cached activations: 'codebook' (2 or 4 bits a value on per-channel levels fitted to "
            "the data; at 2 bits about 20x smaller than float32 and 0.14 points below exact caches in "
            "docs/results.md, within seed noise; decoded on the training device), 'zfp' (error <= tolerance, decoded "
            "on the host), 'lowbit' (2/4/8 bits on an even grid with stochastic rounding), 'int8', 'fp16', 'bf16', "
            "'none' (raw float32). --cache_budget chooses one for you."
        },
    )
    bits: int | None = field(
        default=None,
        metadata={
            "help": "Bits per value of the 'codebook' codec (2 or 4; default 2) and the 'lowbit' codec (2, 4 or 8; "
            "default 4).",
            "choices": [2, 4, 8],
        },
    )
    entropy: str | None = field(
        default=None,
        metadata={
            "help": "Lossless coding of the 'codebook' and 'lowbit' codecs' packed bytes: 'zstd' (smaller, "
            "decompressed on the host; the codebook's default) or 'none' (the training device decodes them as "
            "stored; lowbit's default).",
            "choices": ["none", "zstd"],
        },
    )
    budget: float | None = field(
        default=None,
        metadata={
            "help": "Compression target instead of a codec: the cache must be at least this many times smaller than "
            "float32 (e.g. 16). The build measures every codec setting on its first samples, at each position, and "
            "keeps the most accurate one that meets it; the manifest records the choice and its error. Overrides "
            "--cache_codec."
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
        if self.budget is not None and not self.budget >= 1:
            raise ValueError(
                f"--cache_budget must be a ratio >= 1 (times smaller than float32, e.g. 16), got {self.budget}."
            )
        if self.codec == "budget" and self.budget is None:
            raise ValueError("--cache_codec budget needs --cache_budget (a ratio, e.g. 16).")
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
        if self.bits is not None and self.bits not in ((2, 4) if self.codec == "codebook" else (2, 4, 8)):
            allowed = "2 or 4 with --cache_codec codebook" if self.codec == "codebook" else "2, 4 or 8"
            raise ValueError(f"--cache_bits must be {allowed}, got {self.bits}.")
        if self.entropy not in (None, "none", "zstd"):
            raise ValueError(f"--cache_entropy must be 'none' or 'zstd', got {self.entropy!r}.")
        if self.memory not in ("auto", "device", "host", "disk"):
            raise ValueError(f"--cache_memory must be one of auto, device, host, disk; got {self.memory!r}.")
        if self.decode_threads < 1:
            raise ValueError(f"--cache_decode_threads must be at least 1, got {self.decode_threads}.")

    def codec_config(self) -> dict[str, Any]:
        """The requested codec as a `build_codec` config with every parameter spelled out (so that asking for a
        codec's defaults and naming them give the same cache fingerprint), before a relative tolerance or a budget is
        resolved."""
        if self.budget is not None:
            params = {"name": "budget", "ratio": float(self.budget), "chunk_size": self.chunk_size}
        elif self.codec == "zfp":
            params = {"name": "zfp", "tolerance": self.tolerance, "relative": self.tolerance_relative}
        elif self.codec in ("lowbit", "codebook"):
            given = {"bits": self.bits, "entropy": self.entropy}
            params = {"name": self.codec, **{key: value for key, value in given.items() if value is not None}}
        else:
            params = {"name": self.codec}
        return build_codec(params).config()


def parse_storage_options(text: str | None, flag: str = "--cache_storage_options") -> dict[str, Any]:
    """The storage options of a URL's store, given on the command line as a JSON object (None or empty: none).

    Args:
        text (`str`, *optional*): The flag's value.
        flag (`str`): The flag's name, for the message.

    Raises:
        ValueError: `text` is not a JSON object.
    """
    if text is None or not text.strip():
        return {}
    try:
        options = json.loads(text)
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{{\"anon\": true}}', got {text!r}.")
    return options
