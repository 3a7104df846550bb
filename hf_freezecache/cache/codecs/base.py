"""The interface every activation codec implements, and the chunk checks they share."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch


class ActivationCodec(ABC):
    """Turns a chunk of cached activations into bytes and back.

    A chunk is a float32 array of shape `(k, *sample_shape)`: `k` samples' activations at one block position, with
    `sample_shape` `(C, H, W)` for CNN feature maps, `(T, D)` for transformer tokens or `(D,)` for flat features.

    A codec is immutable once built: everything needed to decode (and to tell two caches apart) is in `config()`, and
    `build_codec(codec.config())` rebuilds an identical codec, so a cache manifest only has to store that dict.
    `encode`, `unpack` and `decode` may be called concurrently from several threads on one codec object (the reader
    decodes on a thread pool); codecs that hold per-call state (zstd contexts) keep it thread-local.

    Decoding has two halves, so that a batch can travel to the training device still compressed:
    - `unpack` (host, per chunk): checks the payload and undoes what only the host can (zstd, zfp), returning the
      chunk's *fields*, named 1-D numpy arrays (`packed_fields` declares them);
    - `expand` (any device, many chunks at once): turns the fields of `n` chunks, stacked, into float32 activations
      with a few batched tensor operations.
    `decode` is `expand(unpack(...))` on the CPU: the host path and the device path are the same code.
    Codecs with `device_decodable = True` leave the values packed in their fields (quantised codes, 16-bit floats),
    so the device does the expansion; the others (zfp) return the decoded float32 values as their one field.

    Subclasses set:
        name (`str`): The registry name, the `"name"` entry of `config()`.
        lossless (`bool`): Whether `decode(encode(x))` is bit-exact for every chunk.
        device_decodable (`bool`): Whether `expand` does the decoding (fields smaller than float32 values).
    and implement `encode`, `packed_fields` and `unpack`, and `expand` unless their one field is `"values"`, the
    float32 activations.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    device_decodable: ClassVar[bool] = False

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
    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        """The fields `unpack` returns for a chunk of `shape`: name -> (length, numpy dtype), in a fixed order.

        Raises:
            `ValueError`: `shape` is not a chunk's shape (`chunk_values`).
        """

    @abstractmethod
    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Host half of decoding: the fields of the encoded chunk `data` of `shape`, as `packed_fields(shape)` says
        (1-D, C-contiguous, writeable; same names, lengths and dtypes).

        `data` may be corrupt or hostile (a cache downloaded from the Hub): a codec must raise a `ValueError`,
        before allocating anything sized from the payload, when the size the payload declares does not fit `shape`.

        Fields are sample-major: the fields of a chunk of `m < k` samples, zero-padded at their end to the lengths
        of a chunk of `k` samples, `expand` (with the `k`-sample shape) to a tensor whose first `m` samples are the
        chunk's. Fields whose length does not depend on the number of samples (per-channel scales) need no padding.
        """

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Device half of decoding: the fields of `n` chunks of `shape`, each stacked into an `(n, length)` tensor on
        one device, as one float32 tensor `(n, *shape)` on that device. Batched tensor operations only (no Python
        loop over chunks or samples), so it runs as well on a GPU as on the CPU.

        The default serves codecs whose one field is `"values"`, the float32 activations themselves.
        """
        values = fields["values"]
        return values.reshape(values.shape[0], *shape).float()

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of `encode`: a new, writeable float32 C-contiguous array of `shape` (the encoded chunk's).

        It is `expand(unpack(data, shape), shape)` on the CPU, so it raises what `unpack` raises.
        """
        fields = {name: torch.from_numpy(array)[None] for name, array in self.unpack(data, shape).items()}
        return np.ascontiguousarray(self.expand(fields, tuple(shape))[0].numpy())

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


def stack_fields(
    chunk_fields: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """The fields of several chunks (`ActivationCodec.unpack`) as `(n, length)` tensors for `expand`, each chunk's
    field zero-padded at its end to `lengths` (a full chunk's, as the fields' sample-major layout allows)."""
    stacked = {}
    for key, length in lengths.items():
        out = np.zeros((len(chunk_fields), length), dtype=chunk_fields[0][key].dtype)
        for row, fields in enumerate(chunk_fields):
            value = fields[key]
            out[row, : len(value)] = value
        stacked[key] = torch.from_numpy(out)
    return stacked


def measure_codec_error(codec: ActivationCodec, activations: np.ndarray, chunk_size: int) -> dict[str, float]:
    """What `codec` does to `activations` (float32, one sample per row) encoded in chunks of `chunk_size`.

    Returns:
        `samples`; the activations' `std`; the largest (`max_abs`) and root-mean-square (`rms`) error of the decoded
        values, and both over `std` (`max_over_std`, `rms_over_std`: comparable across positions and models); and
        the `ratio` of raw to encoded bytes.
    """
    stored, largest, squares = 0, 0.0, 0.0
    for start in range(0, len(activations), chunk_size):
        chunk = np.ascontiguousarray(activations[start : start + chunk_size], dtype=np.float32)
        payload = codec.encode(chunk)
        error = codec.decode(payload, chunk.shape).astype(np.float64) - chunk
        stored += len(payload)
        largest = max(largest, float(np.abs(error).max()))
        squares += float(np.square(error).sum())
    std = float(activations.std(dtype=np.float64))
    rms = math.sqrt(squares / activations.size)
    scale = std if std > 0 else math.inf
    return {
        "samples": len(activations),
        "std": std,
        "max_abs": largest,
        "rms": rms,
        "max_over_std": largest / scale,
        "rms_over_std": rms / scale,
        "ratio": activations.nbytes / max(stored, 1),
    }
