"""Recording SmartFRZ's training data: every block's tailored weights and its CKA to a reference, and the labels.

SmartFRZ section 3.3: train a reference model; train the same network on the same data again, recording each
block's tailored weights and the CKA of its output to the reference's at every freezing stage; label each (stage,
block) by when its CKA settled for good (`label_freeze_points`). The recorded runs form the history corpus
(`corpus.py`, built by `recipes/build_smartfrz_corpus.py`) the predictor is fitted on.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import TrainerCallback

from ...data.batches import probe_batch
from ...model import FreezeCacheModel
from ...models import get_block_adapter
from .._probe import BlockProbe
from .._reference import ReferenceRepresentations, load_reference_state
from .._schedule import EvaluationClock
from ..base import TrainingProgress
from .policy import SmartFRZConfig
from .tailoring import WeightTailor


class HistoryRecorder(TrainerCallback):
    """Records, `records_per_epoch` times per epoch, every block's tailored weights and its linear CKA to a reference
    model on a fixed probe batch; writes them to `output_path` (`.npz`) when training ends. Freezes nothing.

    Args:
        reference (`str`): Output dir or weights file of the reference model (same architecture, trained).
        probe_size (`int`): Training images in the fixed probe batch (the first ones of the training set).
        output_path (`str`): Where to write the history.
        records_per_epoch (`int`): Records per epoch (the policy's `--smartfrz_records_per_epoch`).
        tailored_size (`int`): Weights per record (the predictor's input size).
        seed (`int`): Seed of the tailored weights' selection.
        metadata (`dict`, *optional*): Stored with the history (model, dataset, ...).
    """

    def __init__(
        self,
        reference: str,
        probe_size: int,
        output_path: str,
        records_per_epoch: int = SmartFRZConfig.records_per_epoch,
        tailored_size: int = 1024,
        seed: int = SmartFRZConfig.seed,
        metadata: dict | None = None,
    ) -> None:
        self.reference_state = load_reference_state(reference)
        self.probe_size = probe_size
        self.output_path = output_path
        self.clock = EvaluationClock(records_per_epoch)
        self.tailored_size = tailored_size
        self.seed = seed
        self.metadata = {"reference": os.fspath(reference), "records_per_epoch": records_per_epoch, **(metadata or {})}
        self.records: list[np.ndarray] = []
        self.cka: list[list[float]] = []
        self.epochs: list[float] = []
        self.fractions: list[float] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        # The recipes hand callbacks the FreezeCacheModel wrapper, which carries the block view of the model inside.
        adapter = model.adapter if isinstance(model, FreezeCacheModel) else get_block_adapter(model)
        pixel_values = probe_batch(train_dataloader, self.probe_size, args.device)["pixel_values"]
        self.tailor = WeightTailor(adapter, self.tailored_size, seed=self.seed)
        self.probe = BlockProbe(adapter, pixel_values)
        self.reference = ReferenceRepresentations(adapter, self.reference_state, pixel_values)
        self.reference_state = None

    def on_step_end(self, args, state, control, **kwargs):
        progress = TrainingProgress.from_trainer_state(state)
        if not self.clock.due(progress):
            return
        blocks = range(self.tailor.adapter.num_blocks)
        self.records.append(torch.stack([self.tailor.record(i) for i in blocks]).numpy())
        scores = self.reference.cka({i: output for i, (_, output) in self.probe.run().items()})
        self.cka.append([scores[i] for i in blocks])
        self.epochs.append(progress.epoch)
        self.fractions.append(progress.fraction)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
        # Written under a temporary name and renamed: a run killed while writing leaves no history that looks whole,
        # so a resumable corpus build reruns it.
        partial = f"{self.output_path}.partial.npz"
        np.savez_compressed(
            partial,
            records=np.stack(self.records).astype(np.float32),
            cka=np.asarray(self.cka, dtype=np.float64),
            epochs=np.asarray(self.epochs),
            fractions=np.asarray(self.fractions),
            metadata=json.dumps(self.metadata),
        )
        os.replace(partial, self.output_path)


#: The label rule's tolerance: a block's CKA has settled once it stays, to the end of the run, within this fraction of
#: the whole range it moved over the run.
LABEL_TOLERANCE = 0.1


def label_freeze_points(cka: np.ndarray, tolerance: float = LABEL_TOLERANCE) -> np.ndarray:
    """Freeze labels `(records, blocks)`: 1 from the first record after which the block's CKA to the reference stays
    within `tolerance` times its whole-run range (max - min over the run) until the end, 0 before.

    SmartFRZ labels a layer "freeze" once its CKA to the well-trained model has stabilised (section 3.3). Labelling
    is offline, so "stabilised" can mean what it says: it stays where it is from then on. A band relative to the
    block's own movement means the same in every model: absolute bands (the `cka` policy's online rule, 4 values
    within 0.02) labelled every window of the timm ResNets "freeze" from their first record (their CKA moves less
    than 0.02 in all) and every slowly drifting ViT block stable while it still drifted.
    """
    labels = np.zeros(cka.shape, dtype=np.int64)
    for block in range(cka.shape[1]):
        series = cka[:, block]
        band = tolerance * (series.max() - series.min())
        tail_max = np.maximum.accumulate(series[::-1])[::-1]
        tail_min = np.minimum.accumulate(series[::-1])[::-1]
        first = int(np.argmax(tail_max - tail_min <= band))  # the last record always qualifies
        labels[first:, block] = 1
    return labels
