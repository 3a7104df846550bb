"""`FreezeCacheTrainer`: a `Trainer` that freezes progressively and can train the suffix from cached activations."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainingArguments

from ..cache import ActivationCache, CachedActivationDataset, ChunkShuffleSampler, check_eval_cache_matches
from ..config import FreezeCacheArguments
from ..discard import DiscardableTrainDataset, FreezeCacheCollator, PrefixDiscarder
from ..model import FreezeCacheModel
from ..models import get_block_adapter
from .trainer_callback import FreezeCacheCallback

logger = logging.getLogger(__name__)


class FreezeCacheTrainer(Trainer):
    """`transformers.Trainer` with `FreezeCacheCallback` built in and, with `--discard true`, frozen-prefix discarding.

    The model is wrapped in a `FreezeCacheModel` (`trainer.model`; your model object is the one it trains, and
    `trainer.model.unwrap()` gives it back). A callback cannot replace the Trainer's dataloader (transformers
    #25924), so discarding needs this small subclass. What it changes, and nothing else:

    - the training dataset is wrapped in a `DiscardableTrainDataset` whose source switches from images to the
      activation cache at an epoch boundary (`PrefixDiscarder`); it keeps the number of samples, so steps,
      schedules, the optimizer and resumption continue exactly as without discarding;
    - the training sampler is a `ChunkShuffleSampler` (a plain seeded permutation while reading images, chunk-aware
      shuffling while reading a cache), seeded by `data_seed` or `seed` and the epoch;
    - the collator handles cached-activation batches: they reach the training device still compressed, and
      `_prepare_inputs` decodes them there and applies the feature augmentation (`FreezeCacheCollator.finish`);
    - `evaluate`/`predict` bring a discarded prefix back, so evaluation measures the whole model on raw images;
    - `save_model` and checkpoints write the base model (`save_pretrained` for a transformers model, else its
      state dict as `model.safetensors`), which loads without hf_freezecache.

    Without `--discard` it behaves as `Trainer` plus the callback, with the seeded sampler.

    With `activation_cache` (e.g. from `load_cache`), only the suffix trains, from that cache, from the first step:
    no training images and no prefix weights are needed, and evaluation datasets may be caches of the evaluation
    split (`CachedActivationDataset`), which must hold the same prefix's activations (`check_eval_cache_matches`:
    model, position, prefix weights); evaluating on images would run the model's own (untrained) prefix.

    Under distributed training (DDP), freezing relies on DDP's unused-parameter detection
    (`ddp_find_unused_parameters=True`, set here): the Trainer wraps the model once, before the first freeze, so
    the wrapper cannot be rebuilt around the blocks still training, and frozen or discarded parameters then get no
    gradient, which DDP without detection waits for forever. The price is one traversal of the autograd graph per
    step, and gradients of frozen parameters still travel in DDP's buckets (as zeros).

    Args:
        model (`nn.Module`): The model (a `model_init` is not supported), or a `FreezeCacheModel` of it.
        args (`TrainingArguments`): As for `Trainer`.
        data_collator (`Callable`, *optional*): Collator of image batches.
        train_dataset (`Dataset`): Training images (with their random augmentation).
        eval_dataset (`Dataset`, *optional*): As for `Trainer`.
        freeze_args (`FreezeCacheArguments` or `dict`, *optional*): hf_freezecache options.
        activation_cache (`ActivationCache`, *optional*): Train the suffix from this cache only (see above);
            `train_dataset` must then be None.
        cache_dataset (`Dataset`, *optional*): The training images preprocessed *without* random augmentation, same
            samples in the same order: what the prefix runs over to build a cache. Defaults to `train_dataset`
            (right only when it has no random augmentation).
        callbacks, **kwargs: As for `Trainer`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        *,
        freeze_args: FreezeCacheArguments | dict | None = None,
        cache_dataset: Dataset | None = None,
        activation_cache: ActivationCache | None = None,
        callbacks: list | None = None,
        **kwargs,
    ) -> None:
        if model is None:
            raise ValueError("FreezeCacheTrainer needs `model` (model_init is not supported).")
        if isinstance(freeze_args, dict):
            freeze_args = FreezeCacheArguments(**freeze_args)
        self.freeze_args = freeze_args or FreezeCacheArguments()
        if not isinstance(model, FreezeCacheModel):
            model = FreezeCacheModel(model, get_block_adapter(model, **self.freeze_args.adapter_modules()))
        self.freeze_callback = FreezeCacheCallback(self.freeze_args, model=model)
        self.discarder: PrefixDiscarder | None = None
        freezes = self.freeze_args.freeze_policy != "none" or activation_cache is not None
        if args is not None and args.world_size > 1 and freezes:
            if args.ddp_find_unused_parameters is False:
                raise ValueError(
                    "--ddp_find_unused_parameters false cannot train with frozen blocks under DDP: frozen and "
                    "discarded parameters get no gradient. Leave it unset (hf_freezecache sets it to true)."
                )
            args.ddp_find_unused_parameters = True
        if activation_cache is not None:
            if train_dataset is not None:
                raise ValueError("Give either `train_dataset` (images) or `activation_cache`, not both.")
            if args is None:
                raise ValueError("Training from `activation_cache` needs `args`.")
            args.remove_unused_columns = False
            cached = CachedActivationDataset(
                activation_cache,
                decode_threads=self.freeze_args.cache_decode_threads,
                memory=self.freeze_args.cache_memory,
                device=args.device,
                decode_on_device=True,
            )
            train_dataset = DiscardableTrainDataset(None, cached=cached)
            evaluations = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
            for evaluation in evaluations:
                if isinstance(evaluation, CachedActivationDataset):
                    check_eval_cache_matches(evaluation.cache, activation_cache)
        elif self.freeze_args.discard:
            if args is None or train_dataset is None:
                raise ValueError("--discard true needs `args` and `train_dataset`.")
            if args.dataloader_persistent_workers:
                raise ValueError(
                    "--discard true cannot switch the data source of persistent DataLoader workers: set "
                    "--dataloader_persistent_workers false."
                )
            if args.remove_unused_columns:
                logger.info("Setting remove_unused_columns=False: batches of cached activations are model inputs.")
                args.remove_unused_columns = False
            if cache_dataset is None:
                logger.warning(
                    "No cache_dataset given: the cache is built from train_dataset. If it applies random "
                    "augmentation, one random version of each image is cached; pass the un-augmented split."
                )
            cache_dataset = cache_dataset if cache_dataset is not None else train_dataset
            train_dataset = DiscardableTrainDataset(train_dataset)
        if isinstance(train_dataset, DiscardableTrainDataset):
            data_collator = FreezeCacheCollator(data_collator)
            self.discarder = PrefixDiscarder(
                model,
                self.freeze_args.discard_config(),
                train_dataset,
                data_collator,
                cache_dataset,
                cache_root=os.path.join(args.output_dir, "activation_cache"),
                pinned_cache=activation_cache,
            )
            self.freeze_callback.discarder = self.discarder
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[*(callbacks or []), self.freeze_callback],
            **kwargs,
        )

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ChunkShuffleSampler(dataset, self.args.per_device_train_batch_size, seed=seed)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)
        if isinstance(self.data_collator, FreezeCacheCollator):
            inputs = self.data_collator.finish(inputs, self.args.device)
        return inputs

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer saves `self.model` with `save_pretrained` when it is a transformers model and as a bare state dict
        # otherwise: show it the base model, so a transformers model keeps its config and loads with from_pretrained.
        wrapper = self.model
        self.model = wrapper.unwrap()
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.model = wrapper

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        # Evaluation sees the whole model and un-augmented batches (the collator is shared with training).
        collator = self.data_collator if isinstance(self.data_collator, FreezeCacheCollator) else None
        if collator is not None:
            collator.augment = False
        try:
            with self.model.restored():
                yield
        finally:
            if collator is not None:
                collator.augment = True

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        with self._evaluating():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._evaluating():
            return super().predict(*args, **kwargs)
