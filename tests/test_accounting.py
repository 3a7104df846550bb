import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_freezecache.accounting import CostReport, FreezeStateRecord, measure_step_cost
from hf_freezecache.freezing import FreezingEngine
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet


def _flop_counter_step(model, batch):
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def test_frozen_state_flops_are_lower_and_equal_what_flop_counter_reports(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    full = measure_step_cost(model, cifar_batch)
    assert full.flops_per_sample * 16 == _flop_counter_step(CifarResNet.from_name("resnet20"), cifar_batch)

    FreezingEngine(model).freeze(range(6))
    frozen = measure_step_cost(model, cifar_batch)
    assert frozen.flops_per_sample < full.flops_per_sample
    assert frozen.forward_flops_per_sample == full.forward_flops_per_sample  # the prefix still runs forward
    assert frozen.flops_per_sample * 16 == _flop_counter_step(model, cifar_batch)


def test_memory_counts_gradients_of_trainable_parameters_and_live_optimizer_state(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(**cifar_batch).loss.backward()
    optimizer.step()
    engine = FreezingEngine(model, optimizer)
    engine.freeze(range(3))
    cost = measure_step_cost(model, cifar_batch, optimizer)
    trainable_bytes = 4 * engine.trainable_parameters()
    assert cost.gradient_bytes == trainable_bytes
    assert cost.optimizer_bytes == trainable_bytes  # one momentum buffer per trainable parameter
    assert cost.model_bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert cost.memory_bytes == cost.model_bytes + cost.gradient_bytes + cost.optimizer_bytes + cost.activation_bytes


def test_report_totals_follow_appendix_a1():
    def state(blocks, start, end, flops, memory):
        cost = {"flops_per_sample": flops, "memory_bytes": memory, "activation_bytes": 0}
        return FreezeStateRecord(blocks, len(blocks), 10, 0, start, end_epoch=end, cost=cost)

    report = CostReport("m", "p", 3, train_samples=100, device="cpu")
    report.states = [
        state([], 0.0, 2.0, 30.0, 900),
        state([0], 2.0, 3.0, 20.0, 600),
        state([0, 1], 3.0, 4.0, 10.0, 300),
    ]
    assert report.total_training_flops == pytest.approx(100 * (30 * 2 + 20 * 1 + 10 * 1))
    assert report.average_memory_bytes == pytest.approx((900 * 2 + 600 + 300) / 4)
    assert report.minimum_memory_bytes == 300
    # Against 4 epochs at the first state's (nothing frozen) 30 FLOPs per sample.
    assert report.baseline_training_flops == pytest.approx(100 * 30 * 4)
    assert report.training_flops_saved_fraction == pytest.approx(1 - 9000 / 12000)
    assert "25.0% fewer than the 0.000 TFLOPs" in report.to_markdown()
    report.states[1].one_off_flops = 4000.0  # a cache build can cost more than freezing saved so far
    assert report.training_flops_saved_fraction == pytest.approx(1 - 13000 / 12000)
    assert "8.3% more than" in report.to_markdown()
    report.states[0].frozen_blocks = [0]  # blocks frozen from the start: no nothing-frozen state to compare with
    assert report.baseline_training_flops is None and report.training_flops_saved_fraction is None
    assert CostReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert "| 0-1 | none | 1.00 |" in report.to_markdown()
