"""The plan of a SmartFRZ history corpus: which runs to train and record (`recipes/configs/smartfrz_corpus.yaml`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

#: The variant name of a setup's reference run, which every recorded run of the setup is labelled against.
REFERENCE = "reference"
_SETUP_KEYS = {"name", "family", "dataset", "regime", "args", "variants"}
_REGIMES = ("scratch", "finetune")


@dataclass(frozen=True)
class CorpusRun:
    """One training run of the corpus: a setup's reference (`variant == "reference"`) or one of its recorded runs.

    Args:
        setup (`str`): The setup (model, dataset, regime) it belongs to.
        variant (`str`): `"reference"`, or the recorded run's name within the setup.
        family (`str`): Model family; leave-one-family-out validation holds out one family at a time.
        dataset (`str`): Dataset label (`cifar10`, `fashion_mnist`, `embedded`, ...).
        regime (`str`): `scratch` or `finetune`.
        args (`dict`): The training flags of `recipes/train_image_classifier.py` (defaults, setup, variant merged).
    """

    setup: str
    variant: str
    family: str
    dataset: str
    regime: str
    args: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.setup}/{self.variant}"

    @property
    def is_reference(self) -> bool:
        return self.variant == REFERENCE


def read_plan(path: str | os.PathLike) -> list[CorpusRun]:
    """The runs of a corpus plan, each setup's reference first. A flag set to null in a setup or variant is removed.

    Raises:
        ValueError: one line naming the setup and what is wrong (unknown key or regime, duplicate name, no variants).
    """
    with open(path) as f:
        plan = yaml.safe_load(f)
    if not isinstance(plan, dict) or not isinstance(plan.get("setups"), list):
        raise ValueError(f"{os.fspath(path)!r} is not a corpus plan: it needs a 'setups' list.")
    defaults = plan.get("defaults") or {}
    runs, seen = [], set()
    for setup in plan["setups"]:
        name = setup.get("name") if isinstance(setup, dict) else None
        if not name:
            raise ValueError(f"every setup of {os.fspath(path)!r} needs a name, got {setup!r:.200}.")
        unknown = set(setup) - _SETUP_KEYS
        missing = _SETUP_KEYS - set(setup)
        if unknown or missing:
            raise ValueError(
                f"setup {name!r}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; "
                f"a setup has {sorted(_SETUP_KEYS)}."
            )
        if setup["regime"] not in _REGIMES:
            raise ValueError(f"setup {name!r}: regime {setup['regime']!r} is not one of {_REGIMES}.")
        if name in seen:
            raise ValueError(f"setup {name!r} appears twice in {os.fspath(path)!r}.")
        seen.add(name)
        if not setup["variants"]:
            raise ValueError(f"setup {name!r} has no variants: it would record nothing.")
        base = {**defaults, **setup["args"], "seed": 0}
        variants = [{"name": REFERENCE}] + list(setup["variants"])
        names = [v.get("name") for v in variants]
        if len(set(names)) != len(names) or None in names:
            raise ValueError(f"setup {name!r}: variant names must be given and unique, got {names}.")
        for variant in variants:
            overrides = {k: v for k, v in variant.items() if k != "name"}
            args = {k: v for k, v in {**base, **overrides}.items() if v is not None}
            runs.append(CorpusRun(name, variant["name"], setup["family"], setup["dataset"], setup["regime"], args))
    return runs
