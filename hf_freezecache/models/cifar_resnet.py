"""CIFAR ResNets (He et al. 2016, section 4.2) in the layout of the `pytorch_resnet_cifar10` project."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutput

from . import register_adapter
from .base import BlockAdapter

#: Named variants accepted by `CifarResNet.from_name` and the recipes' `--model`.
CIFAR_RESNET_VARIANTS: dict[str, dict] = {
    **{f"resnet{depth}": {"depth": depth} for depth in (20, 32, 44, 56, 110)},
    # The paper's "ResNet32" (its public code): doubled widths and 1x1-conv shortcuts, 1.66 GFLOPs per training
    # sample, 32x32x32 activations after block 5 (see ../shared/README.md).
    "resnet32-paper": {"depth": 32, "widths": (32, 64, 128), "shortcut": "conv"},
}


class _PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "pad":
                self.shortcut = _PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images, with the `Trainer` calling convention.

    State-dict keys match `pytorch_resnet_cifar10` (`conv1`, `bn1`, `layer{1,2,3}.{i}`, `linear`), so its released
    checkpoints load with `load_state_dict` (see `load_cifar_resnet`).

    Args:
        depth (`int`): 6n+2 (20, 32, 44, 56, 110): n BasicBlocks per stage, 3 stages.
        num_classes (`int`): Size of the output layer.
        widths (`tuple[int, int, int]`): Channels of the three stages.
        shortcut (`str`): "pad" (parameter-free, option A, the released weights) or "conv" (1x1 conv + BN).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: str = "pad",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}.")
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}.")
        n = (depth - 2) // 6
        self.depth, self.widths, self.shortcut_kind = depth, tuple(widths), shortcut
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, planes in enumerate(widths, start=1):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @classmethod
    def from_name(cls, name: str, num_classes: int = 10) -> CifarResNet:
        """Builds a named variant (`resnet20`, ..., `resnet32-paper`), randomly initialised."""
        if name not in CIFAR_RESNET_VARIANTS:
            raise ValueError(f"Unknown CIFAR ResNet {name!r}. Known: {', '.join(CIFAR_RESNET_VARIANTS)}.")
        return cls(num_classes=num_classes, **CIFAR_RESNET_VARIANTS[name])

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(pixel_values)))

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(hidden, 1).flatten(1))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        hidden = self.layer3(self.layer2(self.layer1(self.stem(pixel_values))))
        logits = self.classify(hidden)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def load_cifar_resnet(path: str | os.PathLike, num_classes: int | None = None) -> CifarResNet:
    """Loads a `pytorch_resnet_cifar10` checkpoint (`{"state_dict": {"module.conv1.weight": ...}, ...}`), or the
    `model.safetensors` a run saved (the file, or the run's output folder).

    The depth, widths and shortcut kind are read from the checkpoint. With `num_classes` different from the
    checkpoint's, the output layer is re-initialised (fine-tuning on another label set); everything else is loaded.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No CIFAR ResNet weights at {path}.")
        state = load_file(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    blocks_per_stage = len({key.split(".")[1] for key in state if key.startswith("layer1.")})
    widths = tuple(state[f"layer{s}.0.conv1.weight"].shape[0] for s in (1, 2, 3))
    shortcut = "conv" if any(".shortcut.0.weight" in key for key in state) else "pad"
    saved_classes = state["linear.weight"].shape[0]
    model = CifarResNet(6 * blocks_per_stage + 2, num_classes or saved_classes, widths, shortcut)
    if num_classes is not None and num_classes != saved_classes:
        state = {key: value for key, value in state.items() if not key.startswith("linear.")}
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state)
    return model


@register_adapter("cifar-resnet")
class CifarResNetAdapter(BlockAdapter):
    """CIFAR ResNet: stem = conv1 + bn1 + ReLU; blocks = the 3n BasicBlocks; head = global average pool + linear.

    ResNet-32 has 15 blocks; the paper's discard positions 5 and 10 are the ends of stages 1 and 2.
    """

    family = "cifar-resnet"
    model: CifarResNet

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, CifarResNet)

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.model.layer1, *self.model.layer2, *self.model.layer3]

    def stem_modules(self) -> list[nn.Module]:
        return [self.model.conv1, self.model.bn1]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.stem(pixel_values)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.classify(hidden)
