"""Checks that an adapter splits its model exactly, and names the part of the model's forward it misses if not."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .base import BlockAdapter
from .generic import GenericBlockAdapter

#: Probe images used: a split that works on 4 images works on all, and more only cost time.
MAX_PROBE_IMAGES = 4
_REGISTER_HINT = "register a BlockAdapter subclass with @register_adapter('my-family') in hf_freezecache/models/"


class BlockSplitError(ValueError):
    """An adapter's `suffix(prefix(x, k), k)` is not the model's forward.

    Attributes:
        part (`str`): What is wrong: `"stem"`, `"block"` (a block run alone, or the order or number of the forward's
            calls), `"between"` (the forward changes the activations between two blocks), `"head"`, or `"split"` (every
            part reproduces the forward, but the adapter's `prefix`/`suffix` do not chain them).
        position (`int`): The first checked position whose logits differ.
    """

    def __init__(self, message: str, part: str, position: int) -> None:
        super().__init__(message)
        self.part = part
        self.position = position


def check_block_split(
    adapter: BlockAdapter,
    pixel_values: torch.Tensor,
    positions: Iterable[int] | None = None,
    rtol: float | None = None,
) -> None:
    """Raises `BlockSplitError` unless `adapter.suffix(adapter.prefix(x, k), k)` gives the model's logits at each of
    `positions`.

    Runs the model in eval mode under `torch.no_grad()` on the first `MAX_PROBE_IMAGES` (4) images, and leaves it
    as it was: every module's train/eval flag, its BatchNorm statistics and the RNG states are the same afterwards.
    On a mismatch, the activations of the model's own forward, captured with hooks on the blocks, tell which part is
    wrong: the stem, a block, something the forward does between two blocks, or the head.

    Args:
        adapter (`BlockAdapter`): The adapter to check, over the model it will train.
        pixel_values (`torch.Tensor`): Probe images `(B, C, H, W)`, as the model takes them, on its device.
        positions (`Iterable[int]`, *optional*): Positions to check; defaults to every one, `0..num_blocks`.
        rtol (`float`, *optional*): Largest difference allowed, relative to the largest logit (to the largest value
            of the activations compared while diagnosing). Defaults to the square root of the machine epsilon of
            their dtype (3.5e-4 for float32): built-in families are bit-exact, generic ones may round differently
            (mean vs `adaptive_avg_pool2d`).

    Raises:
        `BlockSplitError`: naming the part of the forward the adapter misses and how to fix it.
        `ValueError`: when a position is outside `0..num_blocks`.
    """
    positions = range(adapter.num_blocks + 1) if positions is None else sorted(set(positions))
    for position in positions:
        adapter._check_position(position)
    pixel_values = pixel_values[:MAX_PROBE_IMAGES]
    with _probe_mode(adapter.model, pixel_values.device):
        logits, calls, outputs = _trace(adapter, pixel_values)
        for position in positions:
            problem = _check(lambda k=position: adapter.suffix(adapter.prefix(pixel_values, k), k), logits, rtol)
            if problem:
                raise _diagnose(adapter, pixel_values, logits, calls, outputs, rtol, position, problem)


@contextmanager
def _probe_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no autograd, forked RNG; restores every module's own flag (frozen modules override `train`)."""
    flags = [(module, module.training) for module in model.modules()]
    devices = [] if device.type == "cpu" else [device.index]
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training


def _trace(
    adapter: BlockAdapter, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[int, Any]], list[list[Any]]]:
    """The model's logits, its block calls in order as `(block index, input)`, and each block's outputs."""
    calls: list[tuple[int, Any]] = []
    outputs: list[list[Any]] = [[] for _ in adapter.blocks]
    handles = []
    for index, block in enumerate(adapter.blocks):

        def keep_input(module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            # The activations are the first argument, whether passed by position or by name.
            calls.append((index, args[0] if args else next(iter(kwargs.values()), None)))

        def keep_output(module: nn.Module, args: tuple, output: Any, index: int = index) -> None:
            outputs[index].append(output)

        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(block.register_forward_hook(keep_output))
    try:
        logits = adapter.model_logits(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return logits, calls, outputs


def _diagnose(
    adapter: BlockAdapter,
    pixel_values: torch.Tensor,
    logits: torch.Tensor,
    calls: list[tuple[int, Any]],
    outputs: list[list[Any]],
    rtol: float | None,
    position: int,
    problem: str,
) -> BlockSplitError:
    """The first part of the split that does not reproduce the model's forward, as an error saying how to fix it."""
    names = adapter.block_names()
    order = [index for index, _ in calls]
    for index, name in enumerate(names):
        if order.count(index) != 1:
            message = (
                f"The model's forward calls block {name!r} {order.count(index)} times, not once: "
                f"{_fix(adapter, 'name in block_modules the modules it calls once each')}."
            )
            return BlockSplitError(message, "block", position)
    if order != sorted(order):
        called = ", ".join(repr(names[index]) for index in order)
        message = f"The model's forward calls the blocks in the order {called}: {_fix(adapter, 'list them so')}."
        return BlockSplitError(message, "block", position)
    inputs = [value for _, value in calls]
    found = _check(lambda: adapter.embed(pixel_values), inputs[0], rtol)
    if found:
        message = (
            f"The stem ({_stem_description(adapter)}) does not give the input the model's forward gives block "
            f"{names[0]!r}: it {found}; {_fix(adapter, 'add the modules the forward runs before it to stem_modules')}."
        )
        return BlockSplitError(message, "stem", position)
    for index, name in enumerate(names):
        found = _check(lambda index=index: adapter.run_block(index, inputs[index]), outputs[index][0], rtol)
        if found:
            message = (
                f"Block {name!r}, run on the input the model's forward gives it, does not give its output there: it "
                f"{found}; the forward calls it differently (more arguments, or a tuple returned): {_REGISTER_HINT} "
                "whose run_block calls it that way."
            )
            return BlockSplitError(message, "block", position)
    for index in range(len(names) - 1):
        found = _mismatch(outputs[index][0], inputs[index + 1], rtol)
        if found:
            message = (
                f"The model's forward changes the activations between blocks {names[index]!r} and "
                f"{names[index + 1]!r}: the output of the first is {found} against the input of the second; "
                f"{_fix(adapter, 'name in block_modules the modules it runs there')}."
            )
            return BlockSplitError(message, "between", position)
    last = outputs[-1][0]
    shape = tuple(last.shape) if isinstance(last, torch.Tensor) else type(last).__name__
    pooling = _pooling_hint(last)
    if isinstance(adapter, GenericBlockAdapter) and adapter.head_module_names is None and not adapter.head_callable:
        message = (
            f"The generic adapter has no head for the {shape} output of the last block {names[-1]!r}: pass "
            f"head_modules (what the forward runs after it{f', with head_pooling={pooling}' if pooling else ''}) or "
            "a head callable."
        )
        return BlockSplitError(message, "head", position)
    found = _check(lambda: adapter.head(last), logits, rtol)
    if found:
        with_pooling = f"head_pooling={pooling} with head_modules for the rest, or " if pooling else ""
        fix = _fix(adapter, f"pass {with_pooling}a head callable")
        message = (
            f"The head ({_head_description(adapter)}) applied to the {shape} output of the last block {names[-1]!r} "
            f"does not give the model's logits: it {found}; the forward pools or normalises there in a way the head "
            f"misses: {fix}."
        )
        return BlockSplitError(message, "head", position)
    message = (
        f"suffix(prefix(x, {position}), {position}) does not give the model's logits: it {problem}, though the stem, "
        f"every block and the head reproduce its forward; the {adapter.family} adapter's prefix or suffix does not "
        f"chain them: {_REGISTER_HINT} that does."
    )
    return BlockSplitError(message, "split", position)


def _check(compute: Callable[[], Any], expected: Any, rtol: float | None) -> str | None:
    """What `compute()` does instead of giving `expected` ("gives ...", "raises ..."), or None when it gives it."""
    try:
        found = _mismatch(compute(), expected, rtol)
    except Exception as error:  # The failure is the diagnosis.
        return _raised(error)
    return f"gives {found}" if found else None


def _mismatch(actual: Any, expected: Any, rtol: float | None) -> str | None:
    """How `actual` differs from `expected` ("a (2, 8) tensor, not (2, 9)"), or None when they agree."""
    if not isinstance(actual, torch.Tensor):
        return f"a {type(actual).__name__}, not a tensor"
    if not isinstance(expected, torch.Tensor):
        return f"a tensor where the forward has a {type(expected).__name__}"
    if actual.shape != expected.shape:
        return f"a {tuple(actual.shape)} tensor, not {tuple(expected.shape)}"
    if rtol is None:
        rtol = torch.finfo(expected.dtype if expected.is_floating_point() else torch.float32).eps ** 0.5
    expected = expected.float()
    error = (actual.float() - expected).abs().max().item() if expected.numel() else 0.0
    tolerance = rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    if not error <= tolerance:
        return f"a {tuple(actual.shape)} tensor off by up to {error:.3g} (tolerance {tolerance:.3g})"
    return None


def _raised(error: Exception) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return f"raises {type(error).__name__}" + (f" ({text[:240]}{'...' if len(text) > 240 else ''})" if text else "")


def _module_names(adapter: BlockAdapter, modules: list[nn.Module]) -> str:
    names = {id(module): name for name, module in adapter.model.named_modules()}
    return ", ".join(names.get(id(module), type(module).__name__) for module in modules)


def _stem_description(adapter: BlockAdapter) -> str:
    if isinstance(adapter, GenericBlockAdapter) and adapter.stem_module_names is None:
        return "captured from the model's forward"
    return f"stem_modules {_module_names(adapter, adapter.stem_modules())}"


def _head_description(adapter: BlockAdapter) -> str:
    if not isinstance(adapter, GenericBlockAdapter):
        return f"the {adapter.family} adapter's head"
    head = "a head callable" if adapter.head_callable else f"head_modules {', '.join(adapter.head_module_names or [])}"
    return f"head_pooling={adapter.head_pooling!r}, {head}"


def _pooling_hint(last_output: Any) -> str | None:
    """The `head_pooling` values that fit the last block's output."""
    dims = last_output.dim() if isinstance(last_output, torch.Tensor) else 0
    return {4: "'avg' (mean over H, W)", 3: "'cls' or 'mean' (over tokens)"}.get(dims)


def _fix(adapter: BlockAdapter, generic_fix: str) -> str:
    """How to fix a part: the generic adapter's options, else a new adapter (a built-in one does not fit the model)."""
    if isinstance(adapter, GenericBlockAdapter):
        return f"{generic_fix}, or {_REGISTER_HINT} when the forward does more than call modules there"
    return f"the {adapter.family} adapter does not fit this {type(adapter.model).__name__}; {_REGISTER_HINT} for it"
