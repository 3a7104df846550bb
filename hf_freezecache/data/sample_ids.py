"""Which stored sample an item of a dataset is, whatever preprocessing or augmentation its transform applies.

Two views of a training set (one augmented, one not) must hold the same samples in the same order when one is
cached next to the other (the token-replacement sidecar stores tokens of the augmented view beside the plain view's
activations). Their items differ by design, so the check compares what they are read from: the stored rows.
"""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
from torch.utils.data import Dataset

# Rows hashed per read: the stored rows of a batch are a few MB at most.
_ROWS_PER_READ = 1024


def sample_ids(dataset: Dataset) -> np.ndarray | None:
    """The identity of every sample of `dataset`: a 64-bit hash of its stored row (image bytes, label, ...), in
    dataset order, the same for every transform of the same rows (`with_transform`, `set_format`).

    Args:
        dataset (`Dataset`): A `datasets.Dataset` (a `select`, `shuffle` or `filter` of one included: the ids
            follow its indices mapping).

    Returns:
        `np.ndarray` of `uint64`, one per sample; None for a dataset whose stored rows cannot be read (not a
        `datasets.Dataset`): its samples have no identity beyond their items.
    """
    if not isinstance(dataset, datasets.Dataset):
        return None
    stored = dataset.with_format("arrow")
    ids = np.empty(len(dataset), dtype=np.uint64)
    for start in range(0, len(dataset), _ROWS_PER_READ):
        for offset, row in enumerate(stored[start : start + _ROWS_PER_READ].to_pylist()):
            digest = hashlib.blake2b(repr(sorted(row.items())).encode(), digest_size=8).digest()
            ids[start + offset] = int.from_bytes(digest, "little")
    return ids


def check_same_samples(dataset: Dataset, other: Dataset, what: str = "the augmented dataset") -> None:
    """Refuses `other` unless it holds the samples of `dataset`, in the same order.

    With two `datasets.Dataset`s the stored rows are compared (`sample_ids`); otherwise only the lengths can be (and
    the labels are compared batch by batch while they are read, see `check_same_labels`).

    Raises:
        ValueError: naming the first sample that differs and how many do.
    """
    if len(other) != len(dataset):
        raise ValueError(f"{what} has {len(other)} samples, the dataset it goes with {len(dataset)}.")
    ids, other_ids = sample_ids(dataset), sample_ids(other)
    if ids is None or other_ids is None:
        return
    differing = np.flatnonzero(ids != other_ids)
    if differing.size:
        raise ValueError(
            f"{what} does not hold the samples of the dataset it goes with, in the same order: sample "
            f"{differing[0]} is another stored row ({differing.size} of {len(ids)} samples differ). Give the same "
            "rows in the same order (e.g. two `with_transform` views of one split)."
        )


def check_same_labels(labels: np.ndarray, other: np.ndarray, first: int, what: str = "the augmented dataset") -> None:
    """Refuses a batch whose labels in `other` are not `labels`, sample for sample (`first`: the first's index).

    Raises:
        ValueError: naming the first sample whose labels differ.
    """
    labels, other = np.asarray(labels).reshape(-1), np.asarray(other).reshape(-1)
    differing = np.flatnonzero(labels != other)
    if differing.size:
        index = first + int(differing[0])
        raise ValueError(
            f"Sample {index} of {what} has label {other[differing[0]]}, the dataset it goes with "
            f"{labels[differing[0]]}: the two do not hold the same samples in the same order."
        )
