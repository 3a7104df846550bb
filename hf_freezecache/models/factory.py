"""Builds the model a recipe names: a CIFAR ResNet, a transformers model, or a timm model.

A name that cannot be built is refused with one line naming it and what is allowed: an unknown name before anything
is downloaded, a Hub id that cannot be reached or found, a folder that holds no transformers model.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
from typing import Any

from safetensors import SafetensorError
from torch import nn

from .cifar_resnet import CIFAR_RESNET_VARIANTS, CifarResNet, load_cifar_resnet
from .wrapper import ImageClassifierWrapper

#: What Hub model ids look like: `namespace/name`. Any other name that is not a local folder is refused unread.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: What loading a checkpoint file that is not one (or not of this model) raises.
_CHECKPOINT_ERRORS = (KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
_ALLOWED = (
    f"a CIFAR ResNet ({', '.join(CIFAR_RESNET_VARIANTS)}), 'timm:<name>' for a timm model, a transformers model "
    "folder, or a Hub model id 'namespace/name'"
)


def build_model(
    name: str, num_labels: int, weights: str | None = None, timm_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Returns a model with the `Trainer` calling convention (`forward(pixel_values, labels)`).

    Args:
        name (`str`): One of
            - a CIFAR ResNet variant (`resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`, `resnet32-paper`);
            - `timm:<model name>` for a timm model (random init, or `weights` as a timm checkpoint file);
            - a transformers model folder or Hub id (`namespace/name`), loaded with
              `AutoModelForImageClassification`.
        num_labels (`int`): Number of classes; a pretrained classifier of another size is re-initialised.
        weights (`str`, *optional*): For CIFAR ResNets, a `pytorch_resnet_cifar10` checkpoint (e.g.
            `../shared/models/resnet-cifar10/resnet20-12fca82f.th`) or a run's `model.safetensors` (or its folder);
            for timm, a checkpoint path.
        timm_kwargs (`dict`, *optional*): Keyword arguments of `timm.create_model` for a `timm:` model, e.g.
            `{"img_size": 32, "patch_size": 4}` turns `deit_tiny_patch16_224` into a 32 x 32, 64-patch DeiT-Tiny.

    Raises:
        `ValueError`: an unknown model name, timm model or option, or weights that do not fit the model.
        `OSError`: a missing weights file, a Hub id that cannot be reached or found, an unreadable model folder.
    """
    if timm_kwargs and not name.startswith("timm:"):
        raise ValueError(f"timm_kwargs={timm_kwargs!r} is only for 'timm:<name>' models, not {name!r}.")
    if name in CIFAR_RESNET_VARIANTS:
        return _cifar_resnet(name, num_labels, weights)
    if name.startswith("timm:"):
        return _timm_model(name.removeprefix("timm:"), num_labels, weights, timm_kwargs)
    if weights is not None:
        raise ValueError("--pretrained_weights is for CIFAR ResNets and timm models; transformers models load theirs.")
    if os.path.isdir(name):
        return _from_folder(name, num_labels)
    if os.path.exists(name):
        raise ValueError(
            f"Model {name!r} is a file, not a model folder: give the folder save_pretrained wrote (a checkpoint "
            "file goes to --pretrained_weights, with a CIFAR ResNet or timm model)."
        )
    if not _HUB_ID.fullmatch(name):
        if os.sep in name or name.startswith((".", "~")):
            raise FileNotFoundError(f"Model folder {name!r} does not exist; give {_ALLOWED}.")
        raise ValueError(f"Unknown model {name!r}{_did_you_mean(name)}: give {_ALLOWED}.")
    return _from_hub(name, num_labels)


def _did_you_mean(name: str) -> str:
    """' (did you mean ...?)' with the CIFAR ResNets and timm models whose names are close to `name`, or ''."""
    import timm

    close = [f"timm:{name}"] if timm.is_model(name.split(".", 1)[0]) else []
    close += difflib.get_close_matches(name, CIFAR_RESNET_VARIANTS, n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _checked_weights(weights: str) -> None:
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--pretrained_weights {weights!r} does not exist.")


def _cifar_resnet(name: str, num_labels: int, weights: str | None) -> CifarResNet:
    if weights is None:
        return CifarResNet.from_name(name, num_classes=num_labels)
    _checked_weights(weights)
    try:
        model = load_cifar_resnet(weights, num_classes=num_labels)
    except _CHECKPOINT_ERRORS as error:
        raise ValueError(
            f"--pretrained_weights {weights!r} is not a CIFAR ResNet checkpoint (pytorch_resnet_cifar10 layout or "
            f"a run's model.safetensors): {_first_line(error)}"
        ) from error
    expected = CifarResNet.from_name(name)
    if (model.depth, model.widths) != (expected.depth, expected.widths):
        raise ValueError(
            f"--pretrained_weights {weights} holds a depth-{model.depth} CIFAR ResNet with widths {model.widths}, "
            f"not a {name} (depth {expected.depth}, widths {expected.widths})."
        )
    return model


def _timm_model(
    timm_name: str, num_labels: int, weights: str | None, timm_kwargs: dict[str, Any] | None
) -> ImageClassifierWrapper:
    import timm
    from huggingface_hub.errors import HfHubHTTPError
    from timm.models import load_checkpoint

    # A registry name may carry a pretrained tag (`resnet18.a1_in1k`); prefixed names (`hf-hub:...`) are timm's.
    architecture = timm_name.split(".", 1)[0]
    if ":" not in timm_name and not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(f'timm:{c}' for c in close)}?)" if close else ""
        raise ValueError(
            f"Unknown timm model {timm_name!r}{hint}; timm.list_models('<pattern>') lists the names timm has, e.g. "
            "timm.list_models('resnet*')."
        )
    if weights is not None:
        _checked_weights(weights)
    try:
        model = timm.create_model(timm_name, num_classes=num_labels, **(timm_kwargs or {}))
    except TypeError as error:
        if not timm_kwargs:
            raise
        raise ValueError(f"timm model {timm_name!r} does not take timm_kwargs {timm_kwargs!r}: {error}") from error
    except (OSError, HfHubHTTPError) as error:  # an `hf-hub:` or `local-dir:` source
        raise OSError(f"timm model {timm_name!r} {_hub_failure(error)}.") from error
    if weights is not None:
        try:
            load_checkpoint(model, weights)
        except _CHECKPOINT_ERRORS as error:
            raise ValueError(
                f"--pretrained_weights {weights!r} does not load into timm model {timm_name!r}: {_first_line(error)}"
            ) from error
    return ImageClassifierWrapper(model, source=f"timm:{timm_name}")


def _from_folder(folder: str, num_labels: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    if not os.access(folder, os.R_OK | os.X_OK):
        raise PermissionError(f"Model folder {folder!r} is not readable: it lacks read permission.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(
            f"Model folder {folder!r} has no config.json: it is not a transformers model folder (the one "
            "save_pretrained writes)."
        )
    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Model folder {folder!r} has a config.json transformers cannot read: {_first_line(error)}"
        ) from error
    try:
        return AutoModelForImageClassification.from_pretrained(
            folder, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Model folder {folder!r} does not hold an image classification model transformers can load: "
            f"{_first_line(error)}"
        ) from error


def _from_hub(repo_id: str, num_labels: int) -> nn.Module:
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(
            repo_id, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except (OSError, HfHubHTTPError) as error:
        raise OSError(
            f"Model {repo_id!r} is not a local folder and {_hub_failure(error)}; give a transformers model folder "
            "(save_pretrained), or check the id."
        ) from error


def _hub_failure(error: BaseException) -> str:
    """Why a download from the Hub failed, told from the `huggingface_hub` errors under transformers' or timm's."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "is a gated Hub repository: accept its conditions on its Hub page, then log in (hf auth login)"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "was not found on the Hub (a private repository needs hf auth login)"
    if constants.HF_HUB_OFFLINE or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return "is not in the local Hub cache, and HF_HUB_OFFLINE=1 forbids downloads"
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in chain):
        return "could not be downloaded: the Hub is not reachable and it is not in the local Hub cache"
    return f"could not be loaded from the Hub: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_source(model: nn.Module) -> tuple[str, str | None]:
    """What a model was built from, for a cache's manifest and card: `(name, revision)`.

    A transformers model gives its Hub id or folder and commit; a timm model the name `build_model` was given
    (`timm:deit_tiny_patch16_224`), or its architecture when only the timm model itself is at hand; a CIFAR ResNet
    its variant name. The revision is None when unknown (the prefix weights' hash, in the cache's fingerprint,
    identifies the weights in every case).
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_name_or_path", ""):
        return config._name_or_path, getattr(config, "_commit_hash", None)
    if isinstance(model, ImageClassifierWrapper):
        if model.source:
            return model.source, None
        model = model.model
    # timm sets `pretrained_cfg` on every model it creates, with or without pretrained weights.
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("architecture"):
        return f"timm:{pretrained_cfg['architecture']}", None
    if isinstance(model, CifarResNet):
        layout = {"depth": model.depth, "widths": model.widths, "shortcut": model.shortcut_kind}
        defaults = {"widths": (16, 32, 64), "shortcut": "pad"}
        for variant, spec in CIFAR_RESNET_VARIANTS.items():
            if {**defaults, **spec} == layout:
                return variant, None
    return type(model).__name__, None
