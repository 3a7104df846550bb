"""Run by tests/test_distributed.py under `accelerate launch`: trains with the recipe and writes, per process, what
it saw (not collected by pytest)."""

import hashlib
import json
import os
import sys

from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
from train_image_classifier import main  # noqa: E402


def tensors_hash(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ProcessReport(TrainerCallback):
    """Writes `process-<index>.json` into the output folder at the end of training."""

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        dataset = train_dataloader.dataset
        adapter_blocks = [model.unwrap().layer1[i] for i in range(3)]
        report = {
            "process_index": args.process_index,
            "world_size": args.world_size,
            "global_step": state.global_step,
            "cache_decode_calls": dataset.cached.cache.decode_calls if dataset.cached is not None else 0,
            "cache_memory": dataset.cached.memory if dataset.cached is not None else None,
            # Parameters, not buffers: BatchNorm statistics of the training blocks are each process's own since the
            # last forward (DDP broadcasts them from process 0 at the start of every forward).
            "parameters_hash": tensors_hash(model.parameters()),
            "prefix_hash": tensors_hash(t for block in adapter_blocks for t in block.state_dict().values()),
            "frozen_requires_grad": any(p.requires_grad for block in adapter_blocks for p in block.parameters()),
        }
        with open(os.path.join(args.output_dir, f"process-{args.process_index}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(callbacks=[ProcessReport()])
