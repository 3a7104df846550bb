"""Shared fixtures: the embedded CIFAR-10 subset and the pretrained weights from ../shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: A 3-block transformers ViT/DeiT config for 32x32 images (add `num_labels`).
TINY_VIT = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
)
#: The same for timm's VisionTransformer.
TINY_TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
sys.path.insert(0, str(ROOT / "recipes"))


def build_cache(
    adapter, position, dataset, folder, codec=None, *, chunk_size=4, sidecars=(), augmented=None, batch_size=16, seed=0
):
    """Builds the cache of `dataset` at block `position` of `adapter`'s model, fingerprinted as the trainer does,
    and opens it: returns `(ActivationCache, fingerprint parts)`. `codec` defaults to `{"name": "none"}`."""
    from hf_freezecache.cache import (
        ActivationCache,
        build_activation_cache,
        build_codec,
        dataset_fingerprint,
        fingerprint_parts,
    )
    from hf_freezecache.data import collate_image_batch

    codec = codec or {"name": "none"}
    extra = {"sidecars": {s.name: s.config() for s in sidecars}} if sidecars else None
    parts = fingerprint_parts(adapter, position, dataset_fingerprint(dataset), codec, chunk_size, extra)
    build_activation_cache(
        adapter, position, dataset, folder, build_codec(codec), chunk_size, parts, collate_fn=collate_image_batch,
        batch_size=batch_size, progress=False, sidecars=list(sidecars), augmented_dataset=augmented, seed=seed,
    )  # fmt: skip
    return ActivationCache.load(folder, expected_fingerprint=parts), parts


def shared_path(*parts: str) -> Path:
    """A file under ../shared (or $HF_FREEZECACHE_SHARED). Missing: fails in CI, skips with the reason elsewhere."""
    base = Path(os.environ.get("HF_FREEZECACHE_SHARED", ROOT.parent / "shared"))
    path = base.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found: tests that use the shared pretrained weights need ../shared beside the repo."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    return shared_path("models", "resnet-cifar10", "resnet20-12fca82f.th")


@pytest.fixture(scope="session")
def resnet32_weights() -> Path:
    return shared_path("models", "resnet-cifar10", "resnet32-d509ac18.th")


@pytest.fixture(scope="session")
def cifar_data():
    from hf_freezecache.data import load_image_classification

    return load_image_classification(max_train_samples=512, augment=False)


@pytest.fixture(scope="session")
def cifar_batch(cifar_data):
    from hf_freezecache.data import collate_image_batch

    return collate_image_batch([cifar_data.train[i] for i in range(16)])


@pytest.fixture
def hub():
    """An in-memory Hub (`fake_hub.FakeHub`) behind huggingface_hub's HTTP client for the test's duration."""
    import fake_hub

    fake = fake_hub.FakeHub()
    fake_hub.install(fake)
    yield fake
    fake_hub.restore()
