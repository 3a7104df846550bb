"""`check_block_split`: adapters whose prefix and suffix do not make the model's forward are refused, with the part
of the forward they miss; the generic adapter's head pooling and head callable make ConvNext-style models split."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import TINY_TIMM_VIT, TINY_VIT
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_freezecache import FreezeCacheArguments
from hf_freezecache.models import (
    BlockSplitError,
    CifarResNet,
    GenericBlockAdapter,
    check_block_split,
    get_block_adapter,
)
from hf_freezecache.models.cifar_resnet import CifarResNetAdapter

CONVNEXT = {
    "block_modules": [f"convnext.encoder.stages.{stage}" for stage in range(4)],
    "stem_modules": ["convnext.embeddings"],
    "head_modules": ["convnext.layernorm", "classifier"],
}
MOBILENET_BLOCKS = [f"features.{index}" for index in range(1, 13)]


def convnext() -> ConvNextForImageClassification:
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32, num_labels=10)
    return ConvNextForImageClassification(config).eval()


def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return mobilenet_v3_small(num_classes=10).eval()


def images(size: int = 64) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def refusal(adapter, pixel_values: torch.Tensor | None = None) -> BlockSplitError:
    with pytest.raises(BlockSplitError) as error:
        check_block_split(adapter, images() if pixel_values is None else pixel_values)
    return error.value


def assert_splits_at_every_position(adapter, pixel_values: torch.Tensor) -> None:
    check_block_split(adapter, pixel_values)
    with torch.no_grad():
        expected = adapter.model_logits(pixel_values)
        for position in range(adapter.num_blocks + 1):
            logits = adapter.suffix(adapter.prefix(pixel_values, position), position)
            torch.testing.assert_close(logits, expected, msg=lambda m, p=position: f"k={p}: {m}")


def test_convnext_without_pooling_is_refused_at_the_head() -> None:
    error = refusal(get_block_adapter(convnext(), **CONVNEXT))
    assert error.part == "head"
    message = str(error)
    for expected in ("convnext.layernorm, classifier", "'convnext.encoder.stages.3'", "(4, 64, 2, 2)"):
        assert expected in message
    assert "head_pooling='avg'" in message and "@register_adapter" in message


def test_convnext_with_avg_pooling_splits_at_every_position() -> None:
    model = convnext()
    adapter = get_block_adapter(model, **CONVNEXT, head_pooling="avg")
    assert adapter.num_blocks == 4
    assert_splits_at_every_position(adapter, images())
    # The pooling has no parameters: the stem freezes with block 0, the head's norm and classifier with no block.
    frozen = {id(p) for index in range(4) for p in adapter.block_parameters(index)}
    head = {id(p) for name in ("convnext.layernorm", "classifier") for p in model.get_submodule(name).parameters()}
    assert {id(p) for p in model.convnext.embeddings.parameters()} <= frozen
    assert frozen.isdisjoint(head) and len(frozen | head) == len(list(model.parameters()))


def test_convnext_with_a_head_callable_follows_the_bound_model() -> None:
    model = convnext()

    def head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.classifier(model.convnext.layernorm(hidden.mean(dim=(-2, -1))))

    adapter = get_block_adapter(model, CONVNEXT["block_modules"], CONVNEXT["stem_modules"], head=head)
    assert_splits_at_every_position(adapter, images())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.mul_(2)
    bound = adapter.bind(other)
    assert (bound.head_callable, bound.head_pooling) == (head, "none")
    assert_splits_at_every_position(bound, images())
    with torch.no_grad():
        hidden = adapter.prefix(images(), 2)
        assert not torch.allclose(bound.suffix(hidden, 2), adapter.suffix(hidden, 2))


def test_token_poolings_on_transformers() -> None:
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)).eval()
    blocks = [f"vit.layers.{index}" for index in range(3)]
    cls = get_block_adapter(vit, blocks, ["vit.embeddings"], ["vit.layernorm", "classifier"], head_pooling="cls")
    assert_splits_at_every_position(cls, images(32))
    without_pooling = get_block_adapter(vit, blocks, ["vit.embeddings"], ["vit.layernorm", "classifier"])
    assert refusal(without_pooling, images(32)).part == "head"
    timm_vit = VisionTransformer(**TINY_TIMM_VIT, class_token=False, global_pool="avg").eval()
    blocks = [f"blocks.{index}" for index in range(3)]
    assert_splits_at_every_position(
        get_block_adapter(timm_vit, blocks, head_modules=["fc_norm", "head"], head_pooling="mean"), images(32)
    )


def test_mobilenet_splits_through_the_generic_adapter() -> None:
    model = mobilenet()
    adapter = get_block_adapter(model, MOBILENET_BLOCKS, ["features.0"], ["classifier"], head_pooling="avg")
    # Pooled with a mean where the forward uses adaptive_avg_pool2d: equal within the float32 tolerance.
    assert_splits_at_every_position(adapter, images())
    # Without the pooling the classifier's first Linear gets (B, 576, 1, 1) maps, which is diagnosed at the head.
    error = refusal(get_block_adapter(model, MOBILENET_BLOCKS, ["features.0"], ["avgpool", "classifier"]))
    assert error.part == "head" and "(4, 576, 2, 2) output of the last block 'features.12'" in str(error)


def test_a_missing_block_is_diagnosed_between_its_neighbours() -> None:
    blocks = [name for name in MOBILENET_BLOCKS if name != "features.6"]
    error = refusal(get_block_adapter(mobilenet(), blocks, ["features.0"], ["classifier"], head_pooling="avg"))
    assert error.part == "between"
    assert "between blocks 'features.5' and 'features.7'" in str(error) and "block_modules" in str(error)


def test_blocks_out_of_forward_order_are_refused() -> None:
    blocks = list(reversed(MOBILENET_BLOCKS))
    error = refusal(get_block_adapter(mobilenet(), blocks, ["features.0"], ["classifier"], head_pooling="avg"))
    assert error.part == "block" and "order 'features.1', 'features.2'" in str(error)


def test_a_stem_missing_a_module_is_diagnosed_at_the_stem() -> None:
    torch.manual_seed(0)
    blocks = [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]
    adapter = get_block_adapter(resnet18(num_classes=10).eval(), blocks, ["conv1", "bn1", "relu"], ["avgpool", "fc"])
    error = refusal(adapter)
    assert error.part == "stem"
    message = str(error)
    assert "conv1, bn1, relu" in message and "'layer1.0'" in message
    assert "(4, 64, 32, 32) tensor, not (4, 64, 16, 16)" in message and "stem_modules" in message


def test_swin_stem_returning_a_tuple_is_diagnosed_at_the_stem() -> None:
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=10
    )
    blocks = ["swin.encoder.layers.0", "swin.encoder.layers.1"]
    model = SwinForImageClassification(config).eval()
    adapter = get_block_adapter(model, blocks, ["swin.embeddings"], ["swin.layernorm", "swin.pooler", "classifier"])
    error = refusal(adapter, images(32))
    assert error.part == "stem" and "gives a tuple, not a tensor" in str(error)


class TupleBlock(nn.Module):
    """A block returning `(hidden, aux)`, as older transformers layers do; its model's forward keeps `[0]`."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(hidden), hidden


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TupleBlock(), TupleBlock()])
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values.mean(dim=(1, 2))
        for block in self.blocks:
            hidden = block(hidden)[0]
        return self.head(hidden)


def test_a_block_with_another_calling_convention_is_diagnosed() -> None:
    adapter = get_block_adapter(TupleModel(), ["blocks.0", "blocks.1"], head_modules=["head"])
    error = refusal(adapter, torch.randn(2, 3, 4, 8))
    assert error.part == "block" and "Block 'blocks.0'" in str(error) and "run_block" in str(error)


def test_a_block_called_twice_is_refused() -> None:
    model = TupleModel()
    model.blocks[1] = model.blocks[0]
    error = refusal(get_block_adapter(model, ["blocks.0"], head_modules=["head"]), torch.randn(2, 3, 4, 8))
    assert error.part == "block" and "calls block 'blocks.0' 2 times" in str(error)


class HeadWithoutPool(CifarResNetAdapter):
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.linear(hidden.flatten(2).amax(dim=2))


class SuffixSkippingTheLastBlock(CifarResNetAdapter):
    def suffix(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        for index in range(position, self.num_blocks - 1):
            hidden = self.run_block(index, hidden)
        return self.head(hidden)


def test_a_built_in_style_adapter_that_does_not_fit_is_refused() -> None:
    model = CifarResNet.from_name("resnet20").eval()
    error = refusal(HeadWithoutPool(model), images(32))
    assert error.part == "head" and "cifar-resnet adapter does not fit this CifarResNet" in str(error)
    error = refusal(SuffixSkippingTheLastBlock(model), images(32))
    assert (error.part, error.position) == ("split", 0)
    assert "suffix(prefix(x, 0), 0) does not give the model's logits: it gives a (4, 10) tensor off by" in str(error)
    # Position 9 runs no block in the suffix, so it splits there.
    check_block_split(SuffixSkippingTheLastBlock(model), images(32), positions=[9])
    with pytest.raises(ValueError, match="Block position 10 is outside"):
        check_block_split(SuffixSkippingTheLastBlock(model), images(32), positions=[10])


class Noisy(nn.Module):
    """Draws random numbers in eval mode too (as a stochastic layer might), without changing the activations."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + 0 * torch.randn_like(hidden)


def block(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), Noisy(), nn.Dropout())


@pytest.mark.parametrize("head_modules", [["4", "5", "6"], ["6"]], ids=["passing", "refused"])
def test_check_leaves_modes_batchnorm_statistics_and_rng_untouched(head_modules: list[str]) -> None:
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), block(8), block(8), *head).train()
    model[3].eval()  # a frozen block, among training ones
    modes = [module.training for module in model.modules()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    adapter = get_block_adapter(model, ["2", "3"], ["0", "1"], head_modules)
    pixel_values = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    with pytest.raises(BlockSplitError) if head_modules == ["6"] else contextlib.nullcontext():
        check_block_split(adapter, pixel_values)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [module.training for module in model.modules()] == modes
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_head_options_are_validated() -> None:
    model = convnext()
    with pytest.raises(ValueError, match="head_pooling must be one of none, avg, cls, mean, got 'max'"):
        GenericBlockAdapter(model, CONVNEXT["block_modules"], head_pooling="max")
    with pytest.raises(ValueError, match="head_modules or a head callable"):
        GenericBlockAdapter(model, **CONVNEXT, head=lambda model, hidden: hidden)
    with pytest.raises(ValueError, match="need block_modules"):
        get_block_adapter(model, head_pooling="avg")
    adapter = get_block_adapter(model, **CONVNEXT, head_pooling="cls")
    with torch.no_grad(), pytest.raises(ValueError, match=r"'cls' does not fit the \(4, 64, 2, 2\).*none, avg"):
        adapter.suffix(adapter.prefix(images(), 4), 4)


def test_head_pooling_flag() -> None:
    args = FreezeCacheArguments(block_modules="a, b", head_modules="fc", head_pooling="avg")
    assert args.adapter_modules() == {
        "block_modules": ["a", "b"],
        "stem_modules": None,
        "head_modules": ["fc"],
        "head_pooling": "avg",
    }
    with pytest.raises(ValueError, match="--head_pooling must be one of none, avg, cls, mean, got 'max'"):
        FreezeCacheArguments(block_modules="a", head_pooling="max")
    with pytest.raises(ValueError, match="need --block_modules"):
        FreezeCacheArguments(head_pooling="cls")
