"""Builds the model a recipe names: a CIFAR ResNet, a transformers model, or a timm model."""

from __future__ import annotations

from typing import Any

from torch import nn

from .cifar_resnet import CIFAR_RESNET_VARIANTS, CifarResNet, load_cifar_resnet
from .wrapper import ImageClassifierWrapper


def build_model(
    name: str, num_labels: int, weights: str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Returns a model with the `Trainer` calling convention (`forward(pixel_values, labels)`).

    Args:
        name (`str`): One of
            - a CIFAR ResNet variant (`resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`, `resnet32-paper`);
            - `timm:<model name>` for a timm model (random init, or `weights` as a timm checkpoint file);
            - a transformers model id or folder, loaded with `AutoModelForImageClassification`.
        num_labels (`int`): Number of classes; a pretrained classifier of another size is re-initialised.
        weights (`str`, *optional*): For CIFAR ResNets, a `pytorch_resnet_cifar10` checkpoint (e.g.
            `../shared/models/resnet-cifar10/resnet20-12fca82f.th`); for timm, a checkpoint path.
        timm_kwargs (`dict`, *optional*): Keyword arguments of `timm.create_model` for a `timm:` model, e.g.
            `{"img_size": 32, "patch_size": 4}` turns `deit_tiny_patch16_224` into a 32 x 32, 64-patch DeiT-Tiny.
    """
    if timm_kwargs and not name.startswith("timm:"):
        raise ValueError(f"timm_kwargs={timm_kwargs!r} is only for 'timm:<name>' models, not {name!r}.")
    if name in CIFAR_RESNET_VARIANTS:
        if weights is None:
            return CifarResNet.from_name(name, num_classes=num_labels)
        model = load_cifar_resnet(weights, num_classes=num_labels)
        expected = CifarResNet.from_name(name)
        if (model.depth, model.widths) != (expected.depth, expected.widths):
            raise ValueError(
                f"--pretrained_weights {weights} holds a depth-{model.depth} CIFAR ResNet with widths {model.widths}, "
                f"not a {name} (depth {expected.depth}, widths {expected.widths})."
            )
        return model
    if name.startswith("timm:"):
        import timm

        kwargs = {**(timm_kwargs or {}), **({"checkpoint_path": weights} if weights else {})}
        return ImageClassifierWrapper(timm.create_model(name.removeprefix("timm:"), num_classes=num_labels, **kwargs))
    if weights is not None:
        raise ValueError("--pretrained_weights is for CIFAR ResNets and timm models; transformers models load theirs.")
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(name, num_labels=num_labels, ignore_mismatched_sizes=True)


def model_source(model: nn.Module) -> tuple[str, str | None]:
    """What a model was built from, for a cache's manifest and card: `(name, revision)`.

    A transformers model gives its Hub id or folder and commit; a timm model its pretrained tag or architecture; a
    CIFAR ResNet its variant name. The revision is None when unknown (the prefix weights' hash, in the cache's
    fingerprint, identifies the weights in every case).
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_name_or_path", ""):
        return config._name_or_path, getattr(config, "_commit_hash", None)
    if isinstance(model, ImageClassifierWrapper):
        pretrained = getattr(model.model, "pretrained_cfg", None) or {}
        name = pretrained.get("hf_hub_id") or pretrained.get("architecture") or type(model.model).__name__
        return f"timm:{name}", None
    if isinstance(model, CifarResNet):
        layout = {"depth": model.depth, "widths": model.widths, "shortcut": model.shortcut_kind}
        defaults = {"widths": (16, 32, 64), "shortcut": "pad"}
        for variant, spec in CIFAR_RESNET_VARIANTS.items():
            if {**defaults, **spec} == layout:
                return variant, None
    return type(model).__name__, None
