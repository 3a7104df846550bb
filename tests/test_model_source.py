"""What a cache records as its source model (`models.model_source`): for a timm model, the name it was built from,
not the class of the network (`VisionTransformer`) or the Hub id of weights it was never given."""

from __future__ import annotations

import pytest
from conftest import TINY_TIMM_VIT

from hf_freezecache.cache import build_activation_cache, build_codec, dataset_fingerprint, fingerprint_parts
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import build_model, get_block_adapter, model_source

#: A 3-block DeiT for 32x32 images.
TINY_DEIT = {key: value for key, value in TINY_TIMM_VIT.items() if key != "num_classes"}
CODEC = {"name": "none"}


@pytest.mark.parametrize(
    "name, timm_kwargs",
    [("timm:resnet18", None), ("timm:deit_tiny_patch16_224", TINY_DEIT), ("timm:resnet18.a1_in1k", None)],
)
def test_a_timm_model_is_named_as_it_was_given(name, timm_kwargs):
    model = build_model(name, 10, timm_kwargs=timm_kwargs)
    assert model_source(model) == (name, None)
    # Without the wrapper, the timm model gives its architecture (the name less a pretrained tag).
    assert model_source(model.model) == (name.split(".")[0], None)


@pytest.mark.parametrize(
    "name, timm_kwargs",
    [("timm:resnet18", None), ("timm:deit_tiny_patch16_224", TINY_DEIT), ("timm:resnet18.a1_in1k", None)],
)
def test_a_cache_of_a_timm_model_records_the_name_it_was_built_from(tmp_path, name, timm_kwargs):
    data = load_image_classification(max_train_samples=8, max_eval_samples=1, augment=False)
    adapter = get_block_adapter(build_model(name, 10, timm_kwargs=timm_kwargs).eval())
    parts = fingerprint_parts(adapter, 1, dataset_fingerprint(data.train_unaugmented), CODEC, 4)
    manifest = build_activation_cache(
        adapter, 1, data.train_unaugmented, tmp_path / "cache", build_codec(CODEC), 4, parts,
        collate_fn=collate_image_batch, batch_size=8, device="cpu", progress=False,
    )  # fmt: skip
    assert manifest.source_model == name
