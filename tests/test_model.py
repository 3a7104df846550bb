"""`FreezeCacheModel`: a wrapper, never a patch. Its forward, train mode, state dict, and the replicas that training
makes of it (deep copies, mixed-precision wrappers, `nn.DataParallel`)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from accelerate.utils import convert_outputs_to_fp32
from torch import nn

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.freezing import FreezingEngine
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet


@pytest.fixture
def model() -> FreezeCacheModel:
    torch.manual_seed(0)
    return FreezeCacheModel(CifarResNet.from_name("resnet20"))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def test_no_method_of_any_module_is_replaced_on_its_instance(model, cifar_batch):
    FreezingEngine(model).freeze(range(3))
    model.discard(3, offload_to="cpu")
    model.train()
    model(prefix_activations=torch.zeros(2, 16, 32, 32), labels=torch.zeros(2, dtype=torch.long))
    with model.restored():
        model(**cifar_batch)
    patched = [
        (name, attribute)
        for name, module in model.named_modules()
        for attribute in ("forward", "train", "eval", "__call__")
        if attribute in vars(module)
    ]
    assert patched == []


def test_train_keeps_frozen_blocks_in_eval_mode_whoever_calls_it(model):
    model.freeze_blocks([0, 4])
    frozen = [m for index in (0, 4) for block in model.adapter.block_modules(index) for m in block.modules()]
    for parent in (model, nn.Sequential(model)):  # the wrapper itself, or a wrapper around it (DDP)
        parent.train()
        assert not any(module.training for module in frozen)
        assert model.adapter.blocks[1].training and model.adapter.blocks[8].training
    model.eval()
    assert not any(module.training for module in model.modules())


def test_forward_with_a_frozen_prefix_is_the_models_and_trains_only_the_rest(model, cifar_batch):
    base = model.unwrap()
    model.eval()
    expected = base(**cifar_batch)
    model.freeze_blocks(range(4))
    output = model(**cifar_batch)
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.loss, expected.loss)
    model.train()
    model(**cifar_batch).loss.backward()
    assert all(p.grad is None for index in range(4) for p in model.adapter.block_parameters(index))
    assert all(p.grad is not None for p in model.adapter.block_parameters(4))


def test_cached_activations_run_only_the_suffix(model, cifar_batch):
    model.eval()
    model.freeze_blocks(range(3))
    with torch.no_grad():
        whole = model(**cifar_batch)
        activations = model.adapter.prefix(cifar_batch["pixel_values"], 3)
    with pytest.raises(ValueError, match="no prefix is discarded"):
        model(prefix_activations=activations, labels=cifar_batch["labels"])
    model.discard(3)
    suffix = model(prefix_activations=activations, labels=cifar_batch["labels"])
    assert torch.equal(suffix.logits, whole.logits) and torch.equal(suffix.loss, whole.loss)


def test_discarding_refuses_positions_it_cannot_train_from(model):
    with pytest.raises(ValueError, match="Blocks 0-2 must be frozen"):
        model.discard(3)
    model.freeze_blocks(range(9))
    with pytest.raises(ValueError, match="so it goes from 1 to 8"):
        model.discard(9)
    model.discard(5)
    with pytest.raises(ValueError, match="cannot go back to 3"):
        model.discard(3)


def test_state_dict_is_the_base_models_and_loads_both_ways(model):
    base_keys = list(model.unwrap().state_dict())
    assert list(model.state_dict()) == base_keys
    plain = CifarResNet.from_name("resnet20")
    plain.load_state_dict(model.state_dict())  # saved weights load into the plain model, strictly
    other = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    assert not torch.equal(other.unwrap().conv1.weight, model.unwrap().conv1.weight)
    other.load_state_dict(plain.state_dict())  # and a plain checkpoint into the wrapper (Trainer's resume)
    assert all(torch.equal(a, b) for a, b in zip(_state(other).values(), _state(model).values(), strict=True))
    # Inside another wrapper (DDP's `module.`), keys keep the parent's prefix and nothing else.
    parent = nn.Sequential()
    parent.add_module("module", other)
    assert list(parent.state_dict()) == [f"module.{key}" for key in base_keys]
    parent.load_state_dict(parent.state_dict())


def _data_parallel_replica(module: nn.Module) -> nn.Module:
    """What `nn.parallel.replicate` makes of a module for another device, with copies of the tensors on the CPU:
    shallow module copies (`_replicate_for_data_parallel` shares every plain attribute with the original) whose
    parameters and buffers are new tensors."""
    replica = module._replicate_for_data_parallel()
    for name, child in module._modules.items():
        replica._modules[name] = _data_parallel_replica(child) if child is not None else None
    for name, param in module._parameters.items():
        replica._parameters[name] = None if param is None else param.detach().clone()
    for name, buffer in module._buffers.items():
        replica._buffers[name] = None if buffer is None else buffer.clone()
    return replica


def test_a_data_parallel_replica_runs_its_own_modules(model, cifar_batch):
    model.eval()
    model.freeze_blocks(range(3))
    expected = model(**cifar_batch).logits
    replica = _data_parallel_replica(model)
    assert replica.adapter is model.adapter  # a plain attribute: shared with the original, as DataParallel does
    torch.testing.assert_close(replica(**cifar_batch).logits, expected, rtol=0, atol=0)
    with torch.no_grad():
        replica.unwrap().layer3[2].conv2.weight.zero_()  # only the replica's copy changes
    changed = replica(**cifar_batch).logits
    assert not torch.equal(changed, expected)
    assert torch.equal(model(**cifar_batch).logits, expected)


def _mixed_precision_forward(model: nn.Module, bound: bool) -> None:
    """Puts on `model` the forward accelerate's `prepare` gives a model under bf16: autocast, outputs in float32.
    With `bound`, as accelerate does for a forward with `__func__` (a method, rebound by `copy.deepcopy`); without,
    as it does for a callable without one (a closure over `model`, which `copy.deepcopy` keeps as it is)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    if bound:
        forward = convert_outputs_to_fp32(autocast(type(model).forward))
        model.forward = forward.__get__(model)
    else:
        model.forward = convert_outputs_to_fp32(autocast(functools.partial(type(model).forward, model)))


@pytest.mark.parametrize("bound", [True, False], ids=["method", "closure"])
def test_a_cost_measurement_never_touches_the_live_model_under_mixed_precision(bound, cifar_batch):
    torch.manual_seed(0)
    live = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    FreezingEngine(live).freeze(range(3))
    _mixed_precision_forward(live, bound)
    before = _state(live)
    rng = torch.get_rng_state()
    cost = measure_step_cost(live, cifar_batch, autocast_dtype=torch.bfloat16)
    assert all(p.grad is None for p in live.parameters())
    assert all(torch.equal(before[key], value) for key, value in live.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert cost.flops_per_sample > 0
    if not bound:
        # What the measurement guards against: a plain deep copy of such a model trains the live one.
        copy.deepcopy(live)(**cifar_batch).loss.backward()
        assert any(p.grad is not None for p in live.parameters())


def test_a_wrapped_model_cannot_be_wrapped_again(model):
    with pytest.raises(ValueError, match="already a FreezeCacheModel"):
        FreezeCacheModel(model)
