"""Run by tests/test_rank_agreement.py as one of two processes (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by the test,
no launcher agent in between, so a process that hangs stays hung): trains with `FreezeCacheTrainer` on gloo and
writes what it saw (not collected by pytest).

    python rank_agreement_worker.py timelines OUTPUT_DIR REFERENCE_WEIGHTS  # every policy, in turn
    python rank_agreement_worker.py discard OUTPUT_DIR                       # discards at block 3 (its cache)
"""

import json
import os
import sys

import torch
from transformers import TrainingArguments, set_seed

from hf_freezecache import FreezeCacheArguments, FreezeCacheTrainer
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet
from hf_freezecache.policies import FreezePolicy, PolicyConfig, TrainingProgress, register_policy


class RankDependentConfig(PolicyConfig):
    pass


@register_policy("rank-dependent", config=RankDependentConfig)
class RankDependent(FreezePolicy):
    """Decides from something each process has of its own (its rank): on process 0, block 0 at step 1 and block 1
    at step 2; elsewhere, block 2 at step 1. Only a decision taken once for all makes the processes agree."""

    name = "rank-dependent"

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        if torch.distributed.get_rank() == 0:
            return set(range(min(progress.global_step, 2)))
        return {2} if progress.global_step >= 1 else set()


POLICIES = {
    "rank-dependent": {},
    "fixed": {"freeze_schedule": "0.5:2"},
    "freezeout": {"freezeout_t0": 0.3},
    "autofreeze": {"autofreeze_evaluations_per_epoch": 4},
    "cka": {"cka_evaluations_per_epoch": 4, "cka_window": 2, "cka_tolerance": 0.5, "policy_probe_size": 16},
    "egeria": {
        "egeria_evaluations_per_epoch": 4,
        "egeria_window": 2,
        "egeria_slope_threshold": 10.0,
        "policy_probe_size": 16,
    },
    "smartfrz": {"smartfrz_records_per_epoch": 4, "smartfrz_min_records": 2},
}


def _trainer(output_dir: str, data, freeze_args: FreezeCacheArguments) -> FreezeCacheTrainer:
    set_seed(0)
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=0.05,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    return FreezeCacheTrainer(
        model=CifarResNet.from_name("resnet20"),
        args=args,
        train_dataset=data.train,
        data_collator=collate_image_batch,
        freeze_args=freeze_args,
        cache_dataset=data.train_unaugmented,
    )


def timelines(output_dir: str, reference: str) -> None:
    data = load_image_classification(max_train_samples=64, augment=False)
    seen = {}
    for policy, options in POLICIES.items():
        extra = {"cka_reference": reference} if policy == "cka" else {}
        freeze_args = FreezeCacheArguments(freeze_policy=policy, cost_report=False, **options, **extra)
        trainer = _trainer(os.path.join(output_dir, policy), data, freeze_args)
        trainer.train()
        events = trainer.freeze_callback.report.freeze_events
        seen[policy] = [[event["block"], event["step"]] for event in events]
    rank = torch.distributed.get_rank()
    with open(os.path.join(output_dir, f"timelines-{rank}.json"), "w") as f:
        json.dump(seen, f)


def discard(output_dir: str) -> None:
    data = load_image_classification(max_train_samples=48, augment=False)
    freeze_args = FreezeCacheArguments(
        freeze_policy="fixed", freeze_schedule="0:3", discard=True, cache_codec="none", cost_report=False
    )
    _trainer(output_dir, data, freeze_args).train()


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    {"timelines": timelines, "discard": discard}[mode](*arguments)
