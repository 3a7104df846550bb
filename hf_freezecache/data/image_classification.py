"""Loads an image-classification dataset (Hub id or local folder) and prepares it for a `Trainer`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import datasets
import torch
from datasets.exceptions import DatasetNotFoundError
from torchvision import transforms

#: The class-balanced CIFAR-10 subset shipped in the package (5,000 train / 1,000 test; see its README.md).
EMBEDDED_CIFAR10 = os.path.join(os.path.dirname(__file__), "cifar10_5k")
#: Normalisation of the shared pretrained CIFAR ResNets (and of ImageNet-pretrained models).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_COLUMNS = ("img", "image", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass
class ImageClassificationData:
    """Train and evaluation splits with on-the-fly preprocessing, and the label names.

    `train_unaugmented` is the training split with the evaluation preprocessing (no random crop or flip): what the
    frozen prefix runs over when an activation cache is built.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    label_names: list[str]
    train_unaugmented: datasets.Dataset

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _find_column(dataset: datasets.Dataset, candidates: tuple[str, ...], what: str) -> str:
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"No {what} column in the dataset: looked for {', '.join(candidates)}, "
        f"found {', '.join(dataset.column_names)}."
    )


def _load_dataset(name_or_path: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(name_or_path)`, refusing in one line a path that is no folder and a Hub id that cannot
    be loaded (`datasets` would try a missing relative folder on the Hub)."""
    if os.path.isfile(name_or_path):
        raise ValueError(f"Dataset {name_or_path!r} is a file: give a dataset folder or a Hub dataset id.")
    local = os.path.isdir(name_or_path)
    if not local and (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))):
        raise FileNotFoundError(f"Dataset folder {name_or_path!r} does not exist.")
    try:
        return datasets.load_dataset(name_or_path)
    except (ConnectionError, DatasetNotFoundError) as error:
        if local:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"Dataset {name_or_path!r} is not a local folder and could not be loaded from the Hub ({reason}); give "
            "a dataset folder, or check the id and the connection."
        ) from error


def load_image_classification(
    name_or_path: str = EMBEDDED_CIFAR10,
    train_split: str = "train",
    eval_split: str = "test",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    image_size: int = 32,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    augment: bool = True,
) -> ImageClassificationData:
    """Loads a dataset with `datasets.load_dataset` and attaches the preprocessing.

    Images are converted to RGB (grayscale is replicated to 3 channels), resized to `image_size` when they differ,
    and normalised; training images are augmented with a random crop (padding size/8) and a horizontal flip, the
    standard CIFAR recipe. Each item becomes `{"pixel_values": tensor, "labels": int}`.

    Args:
        name_or_path (`str`): Hub id (e.g. `uoft-cs/cifar10`) or local folder in the Hub parquet layout.
        train_split, eval_split (`str`): Split names.
        max_train_samples, max_eval_samples (`int`, *optional*): Keep only the first N rows of a split.
        image_size (`int`): Side of the square images the model takes.
        mean, std: Normalisation.
        augment (`bool`): Random crop + flip on the training split.
    """
    raw = _load_dataset(name_or_path)
    for split in (train_split, eval_split):
        if split not in raw:
            raise ValueError(f"Split {split!r} not in {name_or_path}; it has {', '.join(raw)}.")
    train, evaluation = raw[train_split], raw[eval_split]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        evaluation = evaluation.select(range(min(max_eval_samples, len(evaluation))))
    image_column = _find_column(train, _IMAGE_COLUMNS, "image")
    label_column = _find_column(train, _LABEL_COLUMNS, "label")
    label_feature = train.features[label_column]
    label_names = list(label_feature.names) if hasattr(label_feature, "names") else sorted(set(train[label_column]))

    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    crop_flip = [transforms.RandomCrop(image_size, padding=image_size // 8), transforms.RandomHorizontalFlip()]
    train_tf = transforms.Compose([*(crop_flip if augment else []), *normalize])
    eval_tf = transforms.Compose(normalize)

    # Resize matches the short side to `image_size`; the centre crop squares non-square sources.
    fit = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])

    def _make(transform):
        def apply(batch):
            images = []
            for image in batch[image_column]:
                image = image.convert("RGB")
                images.append(transform(image if image.size == (image_size, image_size) else fit(image)))
            return {"pixel_values": images, "labels": batch[label_column]}

        return apply

    return ImageClassificationData(
        train=train.with_transform(_make(train_tf)),
        eval=evaluation.with_transform(_make(eval_tf)),
        label_names=label_names,
        train_unaugmented=train.with_transform(_make(eval_tf)),
    )


def collate_image_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks `{"pixel_values", "labels"}` items into a batch (the `data_collator` for `Trainer`)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }
