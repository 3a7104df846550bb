"""`ResidentChunks`: every chunk of a cache unpacked once into memory (device or host), read from there each epoch."""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from .codecs.base import stack_fields

logger = logging.getLogger(__name__)

# Batches name their store by key, so a batch collated in a DataLoader worker (which must never touch the device)
# carries only indices, and the training process finds the store it already holds. Weak: a store lives as long as
# the dataset that made it.
_STORES: weakref.WeakValueDictionary[str, ResidentChunks] = weakref.WeakValueDictionary()

# Chunks unpacked on the host and copied to the device together: bounds the host memory a load needs.
_SLAB_CHUNKS = 1024


class ResidentChunks:
    """The unpacked fields of every chunk of a cache, in one `(num_chunks, length)` tensor per array and field.

    Loaded once (the chunks are unpacked on host threads a slab at a time, then copied to `device`); a batch then
    costs an `index_select` of its chunks, and decoding (`ActivationCodec.expand`) runs where the store is.

    Args:
        lengths (`dict[str, dict[str, tuple[int, np.dtype]]]`): Per array, its fields' full-chunk lengths and dtypes.
        num_chunks (`int`): Rows of the cache.
        unpack (`Callable[[int], dict[str, dict[str, np.ndarray]]]`): Unpacks one row into its arrays' fields.
        device (`torch.device`): Where to hold the fields: the training device, or the CPU (pinned when a CUDA
            device will read them).
        threads (`int`): Host threads unpacking rows while loading.
        progress (`bool`): Show a progress bar.
    """

    def __init__(
        self,
        lengths: Mapping[str, Mapping[str, tuple[int, np.dtype]]],
        num_chunks: int,
        unpack: Callable[[int], dict[str, dict[str, np.ndarray]]],
        device: torch.device,
        threads: int = 2,
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device)
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.fields: dict[str, dict[str, torch.Tensor]] = {}
        for name, arrays in lengths.items():
            self.fields[name] = {}
            for key, (length, dtype) in arrays.items():
                tensor = torch.zeros((num_chunks, length), dtype=_torch_dtype(dtype), device=self.device)
                self.fields[name][key] = tensor.pin_memory() if pin else tensor
        bar = tqdm(
            total=num_chunks,
            desc=f"Loading the cache into {self.device.type} memory",
            unit="chunk",
            disable=not progress,
        )
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for start in range(0, num_chunks, _SLAB_CHUNKS):
                rows = range(start, min(start + _SLAB_CHUNKS, num_chunks))
                self._fill(rows, list(pool.map(unpack, rows)))
                bar.update(len(rows))
        bar.close()
        self.key = uuid.uuid4().hex
        _STORES[self.key] = self

    def _fill(self, rows: range, unpacked: list[dict[str, dict[str, np.ndarray]]]) -> None:
        for name, arrays in self.fields.items():
            lengths = {key: tensor.shape[1] for key, tensor in arrays.items()}
            slab = stack_fields([fields[name] for fields in unpacked], lengths)
            for key, tensor in arrays.items():
                tensor[rows.start : rows.stop].copy_(slab[key])

    @property
    def nbytes(self) -> int:
        """Bytes held (on `device`)."""
        return sum(t.numel() * t.element_size() for arrays in self.fields.values() for t in arrays.values())

    def gather(self, chunks: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """The fields of rows `chunks` (on `device`), per array: `(len(chunks), length)` tensors."""
        return {
            name: {key: t.index_select(0, chunks) for key, t in arrays.items()} for name, arrays in self.fields.items()
        }


def resident_chunks(key: str) -> ResidentChunks:
    """The store a batch names. Raises a `RuntimeError` when it is gone (its dataset was dropped, or the batch was
    collated for another process)."""
    store = _STORES.get(key)
    if store is None:
        raise RuntimeError(
            f"The resident cache {key} that this batch reads is not loaded in this process: decode batches in the "
            "process that holds the CachedActivationDataset."
        )
    return store


def resident_bytes(lengths: Mapping[str, Mapping[str, tuple[int, np.dtype]]], num_chunks: int) -> int:
    """Bytes a `ResidentChunks` of these fields would hold."""
    per_chunk = sum(
        length * np.dtype(dtype).itemsize for arrays in lengths.values() for length, dtype in arrays.values()
    )
    return per_chunk * num_chunks


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
