"""Image-classification data for recipes and tests: the embedded CIFAR-10 subset and standard preprocessing."""

from .batches import probe_batch
from .image_classification import (
    EMBEDDED_CIFAR10,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassificationData,
    collate_image_batch,
    load_image_classification,
)

__all__ = [
    "EMBEDDED_CIFAR10",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageClassificationData",
    "collate_image_batch",
    "load_image_classification",
    "probe_batch",
]
