"""The interface every activation codec implements, and the chunk checks they share."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np


class ActivationCodec(ABC):
    """Turns a chunk of cached activations into bytes and back.

    A chunk is a float32 array of shape `(k, *sample_shape)`: `k` samples' activations at one block position, with
    `sample_shape` `(C, H, W)` for CNN feature maps, `(T, D)` for transformer tokens or `(D,)` for flat features.

    A codec is immutable once built: everything needed to decode (and to tell two caches apart) is in `config()`, and
    `build_codec(codec.config())` rebuilds an identical codec, so a cache manifest only has to store that dict.
    `encode` and `decode` may be called concurrently from several threads on one codec object (the reader decodes
    on a thread pool); codecs that hold per-call state (zstd contexts) keep it thread-local.

    Subclasses set:
        name (`str`): The registry name, the `"name"` entry of `config()`.
        lossless (`bool`): Whether `decode(encode(x))` is bit-exact for every chunk.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """JSON-serialisable `{"name": ..., **params}`: every parameter needed to decode and to fingerprint."""
        return {"name": self.name}

    def resolve(self, reference: np.ndarray) -> ActivationCodec:
        """Returns the codec to use for activations like `reference` (a sample of them, e.g. the first chunk).

        Codecs whose parameters are relative to the data (zfp with a relative tolerance) return a new codec with
        absolute parameters; the others return `self`. Call it once per position, before the first `encode`.
        """
        return self

    @abstractmethod
    def encode(self, chunk: np.ndarray) -> bytes:
        """Compresses `chunk` (float32, C-contiguous, shape `(k, *sample_shape)`)."""

    @abstractmethod
    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of `encode`: a new, writeable float32 C-contiguous array of `shape` (the encoded chunk's).

        `data` may be corrupt or hostile (a cache downloaded from the Hub): a codec must raise a `ValueError`,
        before allocating anything sized from the payload, when the size the payload declares does not fit `shape`.
        """

    def max_abs_error(self, chunk: np.ndarray) -> float:
        """Worst-case `|decode(encode(chunk)) - chunk|` over the chunk, as the codec guarantees it."""
        return 0.0

    def __repr__(self) -> str:
        params = {key: value for key, value in self.config().items() if key != "name"}
        return f"{self.name}({', '.join(f'{key}={_format(value)}' for key, value in params.items())})"

    # Two codecs are equal when they encode and decode the same way, so a manifest's codec can be compared to the
    # one a run asks for.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActivationCodec):
            return NotImplemented
        return self.config() == other.config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.config(), sort_keys=True))


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def check_chunk(chunk: np.ndarray) -> np.ndarray:
    """Validates a chunk to encode and returns it C-contiguous (no copy when it already is).

    Raises:
        `TypeError`: when `chunk` is not a float32 numpy array.
        `ValueError`: when it is empty or not of shape `(k, D)`, `(k, T, D)` or `(k, C, H, W)`.
    """
    if not isinstance(chunk, np.ndarray) or chunk.dtype != np.float32:
        kind = f"array of {chunk.dtype}" if isinstance(chunk, np.ndarray) else type(chunk).__name__
        raise TypeError(f"Activation codecs encode float32 numpy arrays, got a {kind}.")
    if chunk.ndim not in (2, 3, 4):
        raise ValueError(
            f"Expected a chunk of shape (k, D), (k, T, D) or (k, C, H, W), got shape {chunk.shape} ({chunk.ndim}-D)."
        )
    if chunk.size == 0:
        raise ValueError(f"Cannot encode an empty chunk (shape {chunk.shape}).")
    return np.ascontiguousarray(chunk)


def channel_axis(ndim: int) -> int:
    """The per-channel axis of a chunk: C of (k, C, H, W) feature maps, else the feature axis D (the last)."""
    return 1 if ndim == 4 else ndim - 1


def chunk_values(codec: ActivationCodec, shape: tuple[int, ...]) -> int:
    """The number of values in a chunk of `shape`; raises a `ValueError` unless `shape` is a chunk's shape."""
    if len(shape) not in (2, 3, 4) or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in shape):
        raise ValueError(f"{codec!r}: cannot decode to shape {shape}: chunks are (k, D), (k, T, D) or (k, C, H, W).")
    if min(shape) < 1:
        raise ValueError(f"{codec!r}: cannot decode to shape {tuple(shape)}: every size must be >= 1.")
    return math.prod(int(d) for d in shape)


def check_payload_bytes(codec: ActivationCodec, size: int, itemsize: int, shape: tuple[int, ...]) -> None:
    """Raises a `ValueError` unless `size` bytes are exactly the `itemsize`-byte values of a chunk of `shape`."""
    expected = itemsize * chunk_values(codec, shape)
    if size != expected:
        raise ValueError(
            f"{codec!r}: the payload has {size} bytes but shape {tuple(shape)} needs {expected} ({itemsize} per "
            "value): wrong shape passed to decode, or corrupt data."
        )


def check_decoded_size(codec: ActivationCodec, size: int, shape: tuple[int, ...]) -> None:
    """Raises a `ValueError` when `size` decoded values do not fill `shape` (wrong shape or corrupt payload)."""
    expected = chunk_values(codec, shape)
    if size != expected:
        raise ValueError(
            f"{codec!r}: the payload holds {size} values but shape {tuple(shape)} needs {expected}: wrong shape "
            "passed to decode, or corrupt data."
        )
