import copy

import pytest
import torch

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.freezing import BlockUpdateScaler, FreezingEngine
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet, get_block_adapter


def _train_steps(model, optimizer, batch, steps):
    for _ in range(steps):
        model.train()  # what Trainer does before every step
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def _snapshot(modules):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def test_frozen_blocks_stay_bit_identical_and_others_keep_training(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    adapter = model.adapter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _train_steps(model, optimizer, cifar_batch, 2)
    engine = FreezingEngine(model, optimizer)
    engine.freeze([0, 1, 4])
    frozen = _snapshot(adapter.block_modules(0) + adapter.block_modules(1) + adapter.block_modules(4))
    unfrozen = _snapshot([adapter.blocks[2], adapter.blocks[8]])
    _train_steps(model, optimizer, cifar_batch, 3)

    after = _snapshot(adapter.block_modules(0) + adapter.block_modules(1) + adapter.block_modules(4))
    for before_module, after_module in zip(frozen, after, strict=True):
        for key in before_module:  # weights and BatchNorm running statistics
            assert torch.equal(before_module[key], after_module[key]), key
    changed = _snapshot([adapter.blocks[2], adapter.blocks[8]])
    assert not torch.equal(unfrozen[0]["conv1.weight"], changed[0]["conv1.weight"])
    assert not torch.equal(unfrozen[1]["bn1.running_mean"], changed[1]["bn1.running_mean"])
    assert all(not m.training for m in adapter.block_modules(4)[0].modules())
    assert adapter.blocks[2].training


def test_frozen_parameters_leave_the_optimizer_and_their_state_is_freed(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    adapter = model.adapter
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    _train_steps(model, optimizer, cifar_batch, 1)
    frozen_params = adapter.block_parameters(0) + adapter.block_parameters(1)
    assert all(p in optimizer.state for p in frozen_params)

    FreezingEngine(model, optimizer).freeze([0, 1])
    live = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in live for p in frozen_params)
    assert not any(p in optimizer.state for p in frozen_params)
    assert all(p.grad is None and not p.requires_grad for p in frozen_params)
    assert [len(g["params"]) for g in optimizer.param_groups] == sizes  # the LR scheduler's view is unchanged
    _train_steps(model, optimizer, cifar_batch, 1)

    # A checkpoint of this optimizer loads into a fresh one over all parameters (how Trainer resumes).
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(optimizer.state_dict())
    assert len(fresh.state) == len(optimizer.state)


def test_frozen_prefix_saves_no_activation_for_backward(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    adapter = model.adapter
    FreezingEngine(model).freeze(range(4))
    frozen_model_cost = measure_step_cost(model, cifar_batch)

    hidden = adapter.prefix(cifar_batch["pixel_values"], 4).detach()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()
    }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(adapter.suffix(hidden, 4), cifar_batch["labels"])
    suffix_only = sum(v for k, v in saved.items() if k not in params)
    assert frozen_model_cost.activation_bytes == suffix_only
    assert (
        frozen_model_cost.activation_bytes
        < measure_step_cost(CifarResNet.from_name("resnet20"), cifar_batch).activation_bytes
    )


def test_freezing_an_index_outside_the_model_is_refused():
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    adapter = model.adapter
    engine = FreezingEngine(model)
    with pytest.raises(ValueError, match="Block index 9 is outside the model: blocks go from 0 to 8"):
        engine.freeze([2, 9])
    assert engine.frozen == set() and all(p.requires_grad for p in adapter.block_parameters(2))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
        lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    ],
    ids=["sgd", "adamw", "adam"],
)
def test_update_scaling_equals_a_per_block_learning_rate(make_optimizer, cifar_batch):
    scales = {0: 0.25, 3: 0.5, 8: 0.0}
    model_a = CifarResNet.from_name("resnet20")
    model_b = copy.deepcopy(model_a)
    adapter_a, adapter_b = get_block_adapter(model_a), get_block_adapter(model_b)

    # Reference: one param group per scaled block, with its learning rate multiplied.
    scaled_ids = {id(p) for i in scales for p in adapter_a.block_parameters(i)}
    rest = [p for p in model_a.parameters() if id(p) not in scaled_ids]
    reference = make_optimizer(rest)
    base_lr = reference.param_groups[0]["lr"]
    for index, scale in scales.items():
        reference.add_param_group({"params": adapter_a.block_parameters(index), "lr": base_lr * scale})

    optimizer = make_optimizer(model_b.parameters())
    scaler = BlockUpdateScaler(adapter_b)
    for _ in range(3):
        # Each step starts from identical weights (float rounding would otherwise grow through the gradients);
        # optimizer state is carried over, so momentum and Adam moments are compared across steps too.
        with torch.no_grad():
            for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
                b.copy_(a)
        for model, opt in ((model_a, reference), (model_b, optimizer)):
            opt.zero_grad()
            model(**cifar_batch).loss.backward()
        reference.step()
        scaler.before_step(scales)
        optimizer.step()
        scaler.after_step()
        for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_measuring_a_step_leaves_the_model_and_random_stream_untouched(cifar_batch):
    model = CifarResNet.from_name("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure_step_cost(model, cifar_batch)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
