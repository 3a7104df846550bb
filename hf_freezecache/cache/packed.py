"""Batches of cached samples that are still encoded: collated on the host, moved as they are, decoded on the device.

A `PackedBatch` holds, for every array of the cache (`data` and each sidecar array), the unpacked fields of the
chunks the batch needs (`ActivationCodec.unpack`), or only the chunks' indices when the cache is resident in memory
(`ResidentChunks`); `to` moves it to the training device (accelerate's `send_to_device` and `Trainer` call it) and
`decode` expands the fields there (`ActivationCodec.expand`) and picks the batch's samples. What crosses the
host-to-device link is therefore the compressed batch, and every decoding step after `unpack` runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from .resident import resident_chunks


class ArrayDecoder(Protocol):
    """What decoding one array of a cache needs: an `ActivationCodec` for float arrays, `Int32Values` for ints."""

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]: ...

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]: ...

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor: ...


class Int32Values:
    """The decoder of sidecar int32 arrays (token positions), stored as little-endian int32 without a codec."""

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        return {"values": (math.prod(shape), np.dtype("<i4"))}

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        expected = 4 * math.prod(shape)
        if len(data) != expected:
            raise ValueError(f"int32 array: the payload holds {len(data)} bytes, {expected} expected.")
        return {"values": np.frombuffer(data, dtype="<i4").copy()}

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        values = fields["values"]
        return values.reshape(values.shape[0], *shape).long()


@dataclass(frozen=True)
class ArrayLayout:
    """How one array of a cache is decoded: its decoder and the shape of a full chunk of it `(k, *sample_shape)`."""

    decoder: ArrayDecoder
    chunk_shape: tuple[int, ...]


@dataclass
class PackedBatch:
    """A batch of cached samples, still encoded. Built by `FreezeCacheCollator` from `PackedSample`s.

    Args:
        layouts (`dict[str, ArrayLayout]`): Per array (`"data"`, then the sidecar arrays by name), how to decode it.
        chunks (`torch.Tensor`): `(n,)` int64, the cache rows the batch's samples come from.
        slots (`torch.Tensor`): `(B,)` int64, sample `b` of the batch is sample `slots[b] % k` of chunk
            `chunks[slots[b] // k]` (`k` the chunk size).
        fields (`dict[str, dict[str, torch.Tensor]]`): Per array, its fields of the `n` chunks, `(n, length)` each,
            zero-padded to a full chunk's lengths; empty when the cache is resident (`resident`).
        resident (`str`, *optional*): Key of the `ResidentChunks` holding every chunk's fields (`resident_chunks`).
    """

    layouts: dict[str, ArrayLayout]
    chunks: torch.Tensor
    slots: torch.Tensor
    fields: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    resident: str | None = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def device(self) -> torch.device:
        return self.slots.device

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """The batch on `device` (what crosses the link: the packed fields, or only the indices when resident).

        A copy to an accelerator is asynchronous whatever the caller asks (accelerate passes `non_blocking=False` by
        default): from pinned memory it overlaps the host's next work, the device orders it before the decode that
        reads it, and torch's pinned-memory allocator keeps the source alive until it is done. A copy to the CPU
        blocks, as the host reads it next.
        """
        asynchronous = torch.device(device).type != "cpu"

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=asynchronous)

        return replace(
            self,
            chunks=move(self.chunks),
            slots=move(self.slots),
            fields={name: {key: move(t) for key, t in arrays.items()} for name, arrays in self.fields.items()},
        )

    def pin_memory(self) -> PackedBatch:
        """The batch in page-locked host memory (a `DataLoader` with `pin_memory=True` calls it)."""
        return replace(
            self,
            chunks=self.chunks.pin_memory(),
            slots=self.slots.pin_memory(),
            fields={name: {key: t.pin_memory() for key, t in arrays.items()} for name, arrays in self.fields.items()},
        )

    def select(self, positions: Sequence[int]) -> PackedBatch:
        """The samples at `positions` of this batch, in that order (the chunks stay as they are)."""
        return replace(self, slots=self.slots[torch.as_tensor(positions, dtype=torch.long)])

    def decode(self) -> dict[str, torch.Tensor]:
        """Every array of the batch's samples, decoded where the batch is: `(B, *sample_shape)` per array name.

        Float arrays are float32; int arrays int64. Runs `expand` once per array over all the batch's chunks.
        """
        fields = self.fields
        if self.resident is not None:
            store = resident_chunks(self.resident)
            fields = store.gather(self.chunks.to(store.device))
        decoded = {}
        for name, layout in self.layouts.items():
            arrays = {key: t.to(self.device, non_blocking=True) for key, t in fields[name].items()}
            expanded = layout.decoder.expand(arrays, layout.chunk_shape)
            samples = expanded.reshape(-1, *layout.chunk_shape[1:])
            decoded[name] = samples.index_select(0, self.slots)
        return decoded


@dataclass(frozen=True)
class PackedSample:
    """One sample of a `PackedBatch` that `CachedActivationDataset.__getitems__` prepared for a whole batch: what a
    dataset item holds in place of the decoded activations until the collator gathers the batch."""

    batch: PackedBatch
    position: int


__all__ = [
    "ArrayDecoder",
    "ArrayLayout",
    "Int32Values",
    "PackedBatch",
    "PackedSample",
]
