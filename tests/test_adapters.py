"""Block adapters: family detection, prefix/suffix equivalence at every cut, and how parameters split into blocks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from conftest import TINY_TIMM_VIT, TINY_VIT
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import resnet18
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_freezecache.models import (
    BlockAdapter,
    CifarResNet,
    GenericBlockAdapter,
    ImageClassifierWrapper,
    check_block_split,
    get_block_adapter,
)
from hf_freezecache.models.cifar_resnet import CifarResNetAdapter
from hf_freezecache.models.hf_resnet import HFResNetAdapter
from hf_freezecache.models.hf_vit import HFDeiTAdapter, HFViTAdapter
from hf_freezecache.models.timm_resnet import TimmResNetAdapter
from hf_freezecache.models.timm_vit import TimmViTAdapter

TORCHVISION_RESNET18_BLOCKS = [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]


@dataclass
class Case:
    """A model of one family, what its adapter should be, and the modules after the last block."""

    build: Callable[[], nn.Module]
    adapter_cls: type[BlockAdapter]
    num_blocks: int
    head_modules: list[str]
    wrap: bool = False


CASES = {
    "cifar-resnet20": Case(lambda: CifarResNet.from_name("resnet20"), CifarResNetAdapter, 9, ["linear"]),
    "hf-resnet-bottleneck": Case(
        lambda: ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], num_labels=10)
        ),
        HFResNetAdapter,
        3,
        ["classifier"],
    ),
    "hf-resnet-basic": Case(
        lambda: ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", num_labels=10)
        ),
        HFResNetAdapter,
        3,
        ["classifier"],
    ),
    "hf-vit": Case(
        lambda: ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)),
        HFViTAdapter,
        3,
        ["vit.layernorm", "classifier"],
    ),
    "hf-deit": Case(
        lambda: DeiTForImageClassification(DeiTConfig(**TINY_VIT, num_labels=10)),
        HFDeiTAdapter,
        3,
        ["deit.layernorm", "classifier"],
    ),
    "hf-deit-with-teacher": Case(
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_VIT, num_labels=10)),
        HFDeiTAdapter,
        3,
        ["deit.layernorm", "cls_classifier", "distillation_classifier"],
    ),
    "timm-resnet18": Case(lambda: timm.create_model("resnet18", num_classes=10), TimmResNetAdapter, 8, ["fc"]),
    "timm-resnet10t-wrapped": Case(
        lambda: timm.create_model("resnet10t", num_classes=10), TimmResNetAdapter, 4, ["fc"], wrap=True
    ),
    "timm-vit": Case(lambda: VisionTransformer(**TINY_TIMM_VIT), TimmViTAdapter, 3, ["norm", "fc_norm", "head"]),
    "timm-vit-reg-avg-wrapped": Case(
        lambda: VisionTransformer(**TINY_TIMM_VIT, reg_tokens=2, global_pool="avg"),
        TimmViTAdapter,
        3,
        ["norm", "fc_norm", "head"],
        wrap=True,
    ),
    "timm-deit-distilled": Case(
        lambda: VisionTransformerDistilled(**TINY_TIMM_VIT),
        TimmViTAdapter,
        3,
        ["norm", "fc_norm", "head", "head_dist"],
    ),
}


def build(case: Case) -> tuple[nn.Module, BlockAdapter]:
    """Builds the case's model in eval mode (wrapped if asked) and the adapter `get_block_adapter` picks for it."""
    torch.manual_seed(0)
    model = case.build().eval()
    if case.wrap:
        model = ImageClassifierWrapper(model).eval()
    return model, get_block_adapter(model)


def assert_prefix_suffix_equivalent(adapter: BlockAdapter, image_size: int = 32) -> None:
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = adapter.model_logits(pixel_values)
        for position in range(adapter.num_blocks + 1):
            logits = adapter.suffix(adapter.prefix(pixel_values, position), position)
            # The adapters replay the forward's own op sequence, so the logits match bit for bit.
            torch.testing.assert_close(logits, expected, rtol=0, atol=0, msg=lambda m, p=position: f"k={p}: {m}")


def assert_parameters_partitioned(model: nn.Module, adapter: BlockAdapter, head_modules: list[str]) -> None:
    """Every parameter is frozen with exactly one block, or belongs to the head."""
    names = {id(p): name for name, p in model.named_parameters()}
    assigned = [names[id(p)] for index in range(adapter.num_blocks) for p in adapter.block_parameters(index)]
    inner = model.model if isinstance(model, ImageClassifierWrapper) else model
    assigned += [names[id(p)] for name in head_modules for p in inner.get_submodule(name).parameters()]
    repeated = sorted({name for name in assigned if assigned.count(name) > 1})
    assert not repeated, f"parameters in more than one block or in the head: {repeated}"
    assert sorted(assigned) == sorted(names.values())


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_family_is_detected(case: Case) -> None:
    model, adapter = build(case)
    assert type(adapter) is case.adapter_cls
    assert adapter.model is (model.model if case.wrap else model)
    assert adapter.num_blocks == case.num_blocks


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prefix_then_suffix_is_the_forward(case: Case) -> None:
    _, adapter = build(case)
    assert_prefix_suffix_equivalent(adapter)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_built_in_families_pass_the_split_check(case: Case) -> None:
    _, adapter = build(case)
    check_block_split(adapter, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bind_views_another_instance(case: Case) -> None:
    _, adapter = build(case)
    other = copy.deepcopy(adapter.model)
    bound = adapter.bind(other)
    assert type(bound) is type(adapter) and bound.model is other
    modules = {id(module) for module in other.modules()}
    assert all(id(block) in modules for block in bound.blocks)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for position in range(adapter.num_blocks + 1):
            expected = adapter.prefix(pixel_values, position)
            torch.testing.assert_close(bound.prefix(pixel_values, position), expected, rtol=0, atol=0)
        for parameter in bound.block_parameters(0):
            parameter.add_(0.1)
        assert not torch.equal(bound.prefix(pixel_values, 1), adapter.prefix(pixel_values, 1))
    with pytest.raises(ValueError, match=f"bind needs another {type(adapter.model).__name__}.*got Linear"):
        adapter.bind(nn.Linear(2, 2))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_parameters_split_into_blocks_and_head(case: Case) -> None:
    model, adapter = build(case)
    block0 = {id(p) for p in adapter.block_parameters(0)}
    assert {id(p) for p in adapter.stem_parameters()} <= block0
    assert {id(p) for p in adapter.blocks[0].parameters()} <= block0
    assert_parameters_partitioned(model, adapter, case.head_modules)


@pytest.mark.parametrize(
    ("build_model", "tokens"),
    [
        (lambda: VisionTransformer(**TINY_TIMM_VIT, reg_tokens=1), ["cls_token", "reg_token", "pos_embed"]),
        (lambda: VisionTransformerDistilled(**TINY_TIMM_VIT), ["cls_token", "dist_token", "pos_embed"]),
    ],
    ids=["vit-with-register", "deit-distilled"],
)
def test_timm_vit_stem_takes_root_tokens(build_model: Callable[[], VisionTransformer], tokens: list[str]) -> None:
    model = build_model()
    block0 = {id(p) for p in get_block_adapter(model).block_parameters(0)}
    assert all(id(getattr(model, name)) in block0 for name in tokens)


def test_hf_deit_stem_takes_both_tokens() -> None:
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_VIT, num_labels=10))
    block0 = {id(p) for p in get_block_adapter(model).block_parameters(0)}
    embeddings = model.deit.embeddings
    assert {id(embeddings.cls_token), id(embeddings.distillation_token), id(embeddings.position_embeddings)} <= block0


def test_hf_vit_interpolated_position_embeddings() -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)).eval()
    adapter = HFViTAdapter(model, interpolate_pos_encoding=True)
    assert_prefix_suffix_equivalent(adapter, image_size=48)
    assert_prefix_suffix_equivalent(adapter.bind(copy.deepcopy(model)), image_size=48)


def test_unknown_model_names_families_and_block_modules() -> None:
    with pytest.raises(ValueError) as error:
        get_block_adapter(nn.Linear(2, 2))
    message = str(error.value)
    for family in ("hf-resnet", "hf-vit", "hf-deit", "timm-resnet", "timm-vit"):
        assert family in message
    assert "block_modules" in message


def torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


def test_generic_on_torchvision_resnet18() -> None:
    model = torchvision_resnet18()
    adapter = GenericBlockAdapter(
        model,
        TORCHVISION_RESNET18_BLOCKS,
        stem_modules=["conv1", "bn1", "relu", "maxpool"],
        head_modules=["avgpool", "fc"],
    )
    assert not GenericBlockAdapter.matches(model)
    assert adapter.num_blocks == 8
    assert adapter.block_names() == TORCHVISION_RESNET18_BLOCKS
    assert_prefix_suffix_equivalent(adapter)
    assert_parameters_partitioned(model, adapter, ["fc"])
    bound = adapter.bind(copy.deepcopy(model))
    names = (bound.block_module_names, bound.stem_module_names, bound.head_module_names, bound.head_pooling)
    assert names == (TORCHVISION_RESNET18_BLOCKS, ["conv1", "bn1", "relu", "maxpool"], ["avgpool", "fc"], "none")
    assert_prefix_suffix_equivalent(bound)


def test_generic_on_trainer_style_model() -> None:
    model = ImageClassifierWrapper(torchvision_resnet18())
    blocks = [f"model.{name}" for name in TORCHVISION_RESNET18_BLOCKS]
    adapter = GenericBlockAdapter(model, blocks, head_modules=["model.avgpool", "model.fc"])
    assert_prefix_suffix_equivalent(adapter)


def test_generic_without_stem_and_head_captures_with_hooks() -> None:
    model = torchvision_resnet18()
    adapter = get_block_adapter(model, block_modules=TORCHVISION_RESNET18_BLOCKS)
    assert type(adapter) is GenericBlockAdapter
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(pixel_values))))
        torch.testing.assert_close(adapter.prefix(pixel_values, 0), stem, rtol=0, atol=0)
        torch.testing.assert_close(
            adapter.prefix(pixel_values, 3), model.layer2[0](model.layer1(stem)), rtol=0, atol=0
        )
        features = adapter.prefix(pixel_values, 8)
        torch.testing.assert_close(model.fc(model.avgpool(features).flatten(1)), model(pixel_values), rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_modules"):
        adapter.suffix(features, 8)
    with pytest.raises(ValueError, match="stem_modules"):
        adapter.block_parameters(0)


def test_generic_rejects_unknown_module_names() -> None:
    model = torchvision_resnet18()
    with pytest.raises(ValueError, match=r"block_modules names 'layer9\.0'.*layer1") as error:
        get_block_adapter(model, block_modules=["layer1.0", "layer9.0"])
    assert "Close matches" in str(error.value)
    with pytest.raises(ValueError, match=r"head_modules names 'classifier'.*avgpool, fc"):
        GenericBlockAdapter(model, TORCHVISION_RESNET18_BLOCKS, head_modules=["classifier"])
    with pytest.raises(ValueError, match="repeated: layer1.0"):
        GenericBlockAdapter(model, ["layer1.0", "layer1.0"])


def test_generic_reports_a_block_the_forward_never_calls() -> None:
    model = torchvision_resnet18()
    model.spare = nn.Identity()
    adapter = GenericBlockAdapter(model, ["spare"])
    with pytest.raises(RuntimeError, match="never called block module 'spare'"):
        adapter.prefix(torch.randn(1, 3, 32, 32), 1)
