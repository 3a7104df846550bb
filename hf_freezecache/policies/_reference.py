"""A well-trained reference model's block representations on the probe batch, for CKA-guided freezing."""

from __future__ import annotations

import copy
import os

import torch

from ..models import BlockAdapter
from ._probe import BlockProbe, centered_gram, cka_from_grams


def load_reference_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from a `.safetensors` file, a torch file, or a folder with `model.safetensors` (what
    `Trainer.save_model` writes)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")]
        found = [c for c in candidates if os.path.exists(c)]
        if not found:
            raise FileNotFoundError(
                f"--cka_reference {path!r} is a folder without model.safetensors or pytorch_model.bin; give the "
                "output_dir of a finished training run or a weights file."
            )
        path = found[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--cka_reference {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class ReferenceRepresentations:
    """Centered Gram matrices of a reference model's block outputs on the probe images, and CKA against them.

    The reference is a copy of the training model's architecture with the reference weights loaded; it runs once,
    in eval mode, and only its n x n Gram matrices are kept (n = probe size), not the model.

    Args:
        adapter (`BlockAdapter`): The training model's block view (its architecture is copied).
        state_dict (`dict`): The reference weights, keyed like the training model's `state_dict()`.
        pixel_values (`torch.Tensor`): The probe images.
    """

    def __init__(self, adapter: BlockAdapter, state_dict: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> None:
        reference = copy.deepcopy(adapter.model)
        missing, unexpected = reference.load_state_dict(_viewed_weights(reference, state_dict), strict=False)
        if missing or unexpected:
            raise ValueError(
                "The CKA reference does not match the model being trained: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        for param in reference.parameters():
            param.requires_grad_(False)
        ref_adapter = adapter.bind(reference)
        outputs = BlockProbe(ref_adapter, pixel_values).run()
        self.grams = [centered_gram(outputs[index][1]) for index in range(ref_adapter.num_blocks)]

    def cka(self, outputs: dict[int, torch.Tensor]) -> dict[int, float]:
        """CKA of each given block output (on the probe images) with the reference's output of the same block."""
        return {index: cka_from_grams(centered_gram(output), self.grams[index]) for index, output in outputs.items()}


def _viewed_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of `state_dict` that belongs to `model`, which the adapter may view inside a wrapper: a saved run
    holds the whole model's weights (`model.conv1.weight` for a timm network inside its classifier wrapper), the
    adapter's module only `conv1.weight`. Returns `state_dict` itself when its keys are already the module's."""
    wanted = list(model.state_dict())
    if not wanted or set(wanted) <= set(state_dict):
        return state_dict
    prefixes = {key[: -len(wanted[0])] for key in state_dict if key.endswith("." + wanted[0])}
    for prefix in sorted(prefixes, key=len):
        if all(prefix + key in state_dict for key in wanted):
            return {key: state_dict[prefix + key] for key in wanted}
    return state_dict
