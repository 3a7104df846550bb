import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_freezecache import FreezeCacheArguments, FreezeCacheCallback, FreezeCacheModel, compute_accuracy
from hf_freezecache.data import collate_image_batch
from hf_freezecache.models import CifarResNet


def _training_args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class _SnapshotAtFreeze(TrainerCallback):
    """Records the frozen blocks' full state (weights and BN statistics) right after they freeze."""

    def __init__(self, freeze_callback):
        self.freeze_callback, self.snapshot = freeze_callback, None

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.freeze_callback.engine
        if engine.frozen and self.snapshot is None:
            self.snapshot = {
                i: {k: v.clone() for k, v in engine.adapter.blocks[i].state_dict().items()} for i in engine.frozen
            }


def _trainer(model, data, args, freeze_args, extra_callbacks=()):
    model = FreezeCacheModel(model)  # trains the given model object in place
    callback = FreezeCacheCallback(freeze_args, model=model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_image_batch,
        compute_metrics=compute_accuracy,
        callbacks=[callback, *extra_callbacks],
    )
    return trainer, callback


def test_trainer_keeps_frozen_blocks_and_their_batchnorm_fixed(tmp_path, cifar_data):
    model = CifarResNet.from_name("resnet20")
    freeze_args = FreezeCacheArguments(freeze_policy="fixed", freeze_schedule="1:3")
    trainer, callback = _trainer(model, cifar_data, _training_args(tmp_path), freeze_args)
    probe = _SnapshotAtFreeze(callback)
    trainer.add_callback(probe)
    trainer.train()

    assert callback.engine.frozen == {0, 1, 2}
    for index, saved in probe.snapshot.items():
        for key, value in callback.engine.adapter.blocks[index].state_dict().items():
            assert torch.equal(saved[key], value), (index, key)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["frozen_blocks"] == 0 and logged[-1]["frozen_blocks"] == 3
    assert logged[-1]["trainable_parameters"] < logged[0]["trainable_parameters"]

    report = json.loads((tmp_path / "cost_report.json").read_text())
    first, second = report["states"]
    assert first["frozen_blocks"] == [] and second["frozen_blocks"] == [0, 1, 2]
    assert second["cost"]["flops_per_sample"] < first["cost"]["flops_per_sample"]
    assert second["cost"]["memory_bytes"] < first["cost"]["memory_bytes"]
    assert first["end_epoch"] - first["start_epoch"] == pytest.approx(1.0)
    assert first["cost"]["batch_size"] == 32  # memory is measured at the training batch size
    assert report["totals"]["training_flops"] == pytest.approx(
        512 * (first["cost"]["flops_per_sample"] + second["cost"]["flops_per_sample"])
    )
    assert (tmp_path / "cost_report.md").read_text().startswith("Cost report: CifarResNet (cifar-resnet)")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["freeze_timeline.png", "state_costs.png"]  # no cache
    assert all(entry["discarded_prefix"] == 0 and "cache_stored_mb" not in entry for entry in logged)
    assert sum(entry["newly_frozen_blocks"] for entry in logged) == 3


def test_resume_from_checkpoint_restores_frozen_blocks_and_matches_uninterrupted_training(tmp_path, cifar_data):
    freeze_args = FreezeCacheArguments(freeze_policy="fixed", freeze_schedule="1:3")
    torch.manual_seed(0)
    initial = CifarResNet.from_name("resnet20").state_dict()

    def fresh_model():
        model = CifarResNet.from_name("resnet20")
        model.load_state_dict(initial)
        return model

    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    trainer, _ = _trainer(
        fresh_model(), cifar_data, _training_args(full_dir, save_strategy="steps", save_steps=12), freeze_args
    )
    trainer.train()
    reference = trainer.model.state_dict()

    model = fresh_model()
    trainer, callback = _trainer(model, cifar_data, _training_args(resumed_dir), freeze_args)
    trainer.train(resume_from_checkpoint=str(full_dir / "checkpoint-12"))
    assert callback.engine.frozen == {0, 1, 2}
    assert not any(p.requires_grad for i in range(3) for p in callback.engine.adapter.block_parameters(i))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    report = json.loads((resumed_dir / "cost_report.json").read_text())
    assert [s["frozen_blocks"] for s in report["states"]] == [[], [0, 1, 2]]


def test_a_plain_trainer_with_an_unwrapped_model_is_refused_with_the_fix(tmp_path, cifar_data):
    model = CifarResNet.from_name("resnet20")
    with pytest.raises(TypeError, match=r"pass Trainer\(model=FreezeCacheModel\(model\)"):
        FreezeCacheCallback(FreezeCacheArguments(freeze_policy="freezeout"), model=model)
    callback = FreezeCacheCallback(FreezeCacheArguments(freeze_policy="freezeout"))
    trainer = Trainer(
        model=model,
        args=_training_args(tmp_path),
        train_dataset=cifar_data.train,
        data_collator=collate_image_batch,
        callbacks=[callback],
    )
    with pytest.raises(TypeError, match="trains a FreezeCacheModel, not a CifarResNet"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_recipe_runs_end_to_end_on_the_embedded_data(tmp_path):
    from train_image_classifier import main

    metrics = main(
        [
            "--model", "resnet20", "--freeze_policy", "freezeout", "--output_dir", str(tmp_path),
            "--max_train_samples", "256", "--max_eval_samples", "128", "--num_train_epochs", "2",
            "--per_device_train_batch_size", "32", "--learning_rate", "0.05", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    for name in ("model.safetensors", "cost_report.json", "cost_report.md", "trainer_state.json", "eval_results.json"):
        assert (tmp_path / name).exists(), name
    CifarResNet.from_name("resnet20").load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict
    report = json.loads((tmp_path / "cost_report.json").read_text())
    assert report["states"][-1]["frozen_blocks"] == list(range(9))
    assert report["totals"]["minimum_memory_bytes"] < report["states"][0]["cost"]["memory_bytes"]


def test_a_model_whose_module_names_miss_part_of_its_forward_is_refused_before_training(tmp_path, cifar_data):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from hf_freezecache import FreezeCacheTrainer
    from hf_freezecache.models import BlockSplitError

    def trainer(**head) -> FreezeCacheTrainer:
        config = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32, num_labels=10)
        freeze_args = FreezeCacheArguments(
            freeze_policy="fixed",
            freeze_schedule="0:1",
            block_modules=",".join(f"convnext.encoder.stages.{i}" for i in range(4)),
            stem_modules="convnext.embeddings",
            head_modules="convnext.layernorm,classifier",
            **head,
        )
        return FreezeCacheTrainer(
            model=ConvNextForImageClassification(config),
            args=_training_args(tmp_path, num_train_epochs=1, max_steps=2),
            train_dataset=cifar_data.train,
            data_collator=collate_image_batch,
            freeze_args=freeze_args,
        )

    # ConvNext averages over H and W inside its own forward, before `convnext.layernorm`: the names miss it.
    refused = trainer()
    with pytest.raises(BlockSplitError, match="head_pooling='avg'"):
        refused.train()
    assert refused.state.global_step == 0
    accepted = trainer(head_pooling="avg")
    accepted.train()
    assert accepted.state.global_step == 2 and accepted.freeze_callback.engine.frozen == {0}
