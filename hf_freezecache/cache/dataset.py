"""`CachedActivationDataset`: the samples of an activation cache, read from disk, host memory or device memory."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .codecs.base import stack_fields
from .memory import choose_memory
from .packed import PackedBatch, PackedSample
from .reader import DATA, ActivationCache
from .resident import ResidentChunks
from .sidecars import SIDECAR_COLUMN_PREFIX

logger = logging.getLogger(__name__)

ACTIVATIONS = "prefix_activations"


class CachedActivationDataset(Dataset):
    """Samples of an `ActivationCache` as a map-style dataset of the training set's length.

    Item `i` is sample `i` of the cached split: `{"prefix_activations": float32 tensor, "labels": int}`, plus
    `"sidecar.<name>"` tensors when the cache stores sidecar arrays. `__getitems__` (used by `DataLoader` for a
    whole batch) reads each row the batch needs once and keeps the rows of the previous batch, so a row split
    across two consecutive batches is not read twice; with the `ChunkShuffleSampler` every row is read once per
    epoch.

    Where the rows are read from (`memory`):
    - `"disk"`: the memory-mapped shards, unpacked per batch on `decode_threads` threads;
    - `"host"`: the payloads copied once into process memory (`ActivationCache.load_into_memory`, which serves every
      reader of that cache object), unpacked per batch;
    - `"device"`: every row unpacked once into `device` memory (`ResidentChunks`): a batch is an index lookup and
      the decoding (`ActivationCodec.expand`) runs on `device`; needs a codec that decodes on the device;
    - `"auto"`: `choose_memory` picks one from the codec and the free memory.

    DataLoader workers started with spawn or forkserver get the cache's folder and manifest only, and reopen its
    shards memory-mapped (`"disk"` and `"host"` alike: the OS page cache shares the pages between processes; the
    shards' checksums are not verified again, but a folder that now holds another cache is refused); with
    `"device"` they get the store's key. Forked workers share the training process's memory as it is.

    With `decode_on_device=True`, items hold a `PackedSample` instead of decoded tensors: `FreezeCacheCollator`
    gathers them into a `PackedBatch`, which travels to the training device compressed and is decoded there
    (`FreezeCacheCollator.finish`). Otherwise batches are decoded here, on the CPU, by the same code.

    Args:
        cache (`ActivationCache`): The cache.
        decode_threads (`int`): Threads unpacking the rows of one batch (per DataLoader worker), and loading rows.
        memory (`str`): `"auto"`, `"device"`, `"host"` or `"disk"` (see above).
        device (`torch.device` or `str`, *optional*): The training device (default: the CPU).
        decode_on_device (`bool`): Hand out packed samples to decode on the training device (see above).
        progress (`bool`): Show a progress bar while loading rows into memory.
    """

    def __init__(
        self,
        cache: ActivationCache,
        decode_threads: int = 2,
        memory: str = "disk",
        device: torch.device | str | None = None,
        decode_on_device: bool = False,
        progress: bool = True,
    ) -> None:
        self.cache = cache
        self.decode_threads = decode_threads
        self.device = torch.device(device if device is not None else "cpu")
        self.decode_on_device = decode_on_device
        self.memory, reason = choose_memory(cache, memory, self.device)
        self._store: ResidentChunks | None = None
        self._store_key: str | None = None
        fields = cache.field_lengths()
        if self.memory == "device":
            self._store = ResidentChunks(fields, cache.num_chunks, cache.unpack, self.device, decode_threads, progress)
            self._store_key = self._store.key
        elif self.memory == "host":
            cache.load_into_memory()
        logger.info(
            "Reading the cache in %s from %s memory (%s): %.1f MB held there.",
            cache.folder,
            self.memory,
            reason,
            self.held_bytes / 2**20,
        )
        self._lengths = {name: {key: length for key, (length, _) in f.items()} for name, f in fields.items()}
        self._labels = torch.tensor(cache.labels)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._recent: OrderedDict[int, dict[str, dict[str, np.ndarray]]] = OrderedDict()

    @property
    def chunk_size(self) -> int:
        return self.cache.chunk_size

    @property
    def held_bytes(self) -> int:
        """Bytes of the cache held in memory: on `device` (`memory="device"`), in host memory (`"host"`), or 0."""
        if self._store is not None:
            return self._store.nbytes
        return self.cache.memory_bytes

    def memory_summary(self) -> dict[str, Any]:
        """Where the cache is read from and the bytes held there, for logs and the cost report."""
        where = str(self.device) if self.memory == "device" else ("host" if self.memory == "host" else "disk")
        return {"memory": self.memory, "held_bytes": self.held_bytes, "held_on": where}

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decoded(self.pack([index]))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        batch = self.pack(indices)
        if not self.decode_on_device:
            return self._decoded(batch)
        labels = self._labels[torch.as_tensor(list(indices), dtype=torch.long)].tolist()
        return [{ACTIVATIONS: PackedSample(batch, i), "labels": label} for i, label in enumerate(labels)]

    def pack(self, indices: Sequence[int]) -> PackedBatch:
        """The samples `indices`, in that order, as a `PackedBatch` on the host (unpacked rows, or indices into the
        resident rows)."""
        rows = self.cache.layouts[DATA].chunk_shape[0]  # the chunk size, or fewer samples in all
        positions: dict[int, int] = {}
        slots = []
        for index in indices:
            chunk, offset = divmod(int(index), self.chunk_size)
            slots.append(positions.setdefault(chunk, len(positions)) * rows + offset)
        needed = list(positions)
        batch = PackedBatch(
            layouts=self.cache.layouts,
            chunks=torch.tensor(needed, dtype=torch.long),
            slots=torch.tensor(slots, dtype=torch.long),
            resident=self._store_key,
        )
        if self._store_key is not None:
            return batch
        missing = [c for c in needed if c not in self._recent]
        unpacked = dict(zip(missing, self._unpack_many(missing), strict=True))
        unpacked.update({c: self._recent[c] for c in needed if c in self._recent})
        self._recent = OrderedDict((c, unpacked[c]) for c in needed)
        batch.fields = {
            name: stack_fields([unpacked[c][name] for c in needed], lengths) for name, lengths in self._lengths.items()
        }
        return batch

    def _decoded(self, batch: PackedBatch) -> list[dict[str, Any]]:
        arrays = {name: value.cpu() for name, value in batch.decode().items()}
        labels = self._labels[self._sample_indices(batch)].tolist()
        items = []
        for i, label in enumerate(labels):
            item = {ACTIVATIONS: arrays[DATA][i], "labels": label}
            item.update({SIDECAR_COLUMN_PREFIX + name: arrays[name][i] for name in arrays if name != DATA})
            items.append(item)
        return items

    def _sample_indices(self, batch: PackedBatch) -> torch.Tensor:
        """The cache's sample indices of the batch's samples, in batch order."""
        rows = self.cache.layouts[DATA].chunk_shape[0]
        slots = batch.slots.cpu()
        return batch.chunks.cpu()[slots // rows] * self.chunk_size + slots % rows

    def _unpack_many(self, chunks: list[int]) -> list[dict[str, dict[str, np.ndarray]]]:
        if len(chunks) <= 1 or self.decode_threads <= 1:
            return [self.cache.unpack(c) for c in chunks]
        if self._pool is None or self._pool_pid != os.getpid():  # a DataLoader worker needs its own threads
            self._pool = ThreadPoolExecutor(max_workers=self.decode_threads)
            self._pool_pid = os.getpid()
        return list(self._pool.map(self.cache.unpack, chunks))

    def __getstate__(self) -> dict[str, Any]:
        # A worker process gets the store's key only: the batches it collates name the store, which stays in (and
        # is read by) the training process. The cache pickles as its folder and manifest (`ActivationCache` reopens
        # it), and the labels are taken from it again, so that the pickle's size does not grow with the cache.
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=None, _recent=OrderedDict(), _store=None)
        del state["_labels"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._labels = torch.tensor(self.cache.labels)
