"""Run by tests/test_build_failures.py as one of 2 processes (gloo on the CPU) building caches together, where builds
fail on one process in different stages (not collected by pytest).

    python build_failure_worker.py <folder>   # with RANK (0 or 1), WORLD_SIZE=2, MASTER_ADDR and MASTER_PORT

In order, each in its own cache folder under <folder>: the image of sample 5 is unreadable on process 1 (it fails
while the codec is resolved); the main process cannot publish the cache (its destination is a file); a build that
succeeds, compared with the same build by the main process alone; and last, the image of sample 40 is unreadable on
process 1 the second time it is read (in process 1's share), left to end both processes. The first two failures'
messages, and whether the good build's rows are the single-process build's, go to `<folder>/results-<rank>.json`.
"""

import json
import os
import sys

import datasets
import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.utils.data import Dataset

from hf_freezecache.cache import build_activation_cache, build_codec
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter


class Unreadable(Dataset):
    """`dataset`, except that sample `bad` raises `OSError` once it has been read `good_reads` times."""

    def __init__(self, dataset, bad: int, good_reads: int = 0):
        self.dataset, self.bad, self.good_reads = dataset, bad, good_reads

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.bad:
            if self.good_reads == 0:
                raise OSError(f"image {index} is unreadable")
            self.good_reads -= 1
        return self.dataset[index]


def main(folder: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    processes = PartialState(cpu=True)
    torch.manual_seed(0)
    adapter = get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())
    images = load_image_classification(max_train_samples=64, augment=False).train_unaugmented

    def build(dataset, name, group=processes):
        return build_activation_cache(
            adapter,
            3,
            dataset,
            os.path.join(folder, name),
            build_codec({"name": "fp16"}),
            4,
            {},
            collate_fn=collate_image_batch,
            batch_size=16,
            progress=False,
            processes=group,
        )

    def failure(dataset, name) -> str:
        try:
            build(dataset, name)
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "no error"

    results = {"prepare": failure(Unreadable(images, 5) if rank == 1 else images, "prepare")}
    if rank == 0:
        with open(os.path.join(folder, "blocked"), "w") as f:
            f.write("a file where the cache should go")
    dist.barrier()
    results["publish"] = failure(images, "blocked")
    build(images, "cache")
    if rank == 0:
        build(images, "single", group=None)
        rows = [datasets.load_from_disk(os.path.join(folder, name)).data.to_pydict() for name in ("cache", "single")]
        results["same_rows"] = rows[0] == rows[1]
    with open(os.path.join(folder, f"results-{rank}.json"), "w") as f:
        json.dump(results, f)
    build(Unreadable(images, 40, good_reads=1) if rank == 1 else images, "share")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        # The last build fails on purpose; the gloo group must go before the interpreter does, or its threads may
        # abort the process at exit ("terminate called without an active exception") after the traceback.
        if dist.is_initialized():
            dist.destroy_process_group()
