"""Run by tests/test_cache_store.py as one of 2 processes (gloo on the CPU) that build one cache into a store they
reach by URL, each staging its share in a local folder of its own (not collected by pytest).

    python store_worker.py <url> <local_dir> <results>   # with RANK (0 or 1), WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT

Both processes call `reuse_or_build_cache` for the cache at `<url>` twice (the second call must reuse it), with
`<local_dir>` (a folder no other process knows) for their staging and downloads. Process 0 also builds the same
cache alone into `<local_dir>/single`. Each writes what it saw to `<results>/<rank>.json`.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

from hf_freezecache.cache.config import CacheConfig
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.discard import CacheBuildSettings, DiscardConfig, reuse_or_build_cache
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet, get_block_adapter


def rows_digest(cache) -> str:
    """sha256 of every row's columns, in order (Python bytes and lists straight from Arrow)."""
    digest = hashlib.sha256()
    table = cache.rows.data
    for name in sorted(table.column_names):
        digest.update(
            json.dumps([name, [v.hex() if isinstance(v, bytes) else v for v in table[name].to_pylist()]]).encode()
        )
    return digest.hexdigest()


def main(url: str, local_dir: str, results: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    processes = PartialState(cpu=True)
    torch.manual_seed(0)
    base = CifarResNet.from_name("resnet20", num_classes=10)
    model = FreezeCacheModel(base, get_block_adapter(base))
    images = load_image_classification(max_train_samples=40, augment=False).train_unaugmented
    config = DiscardConfig(cache=CacheConfig(codec="fp16", chunk_size=4), cache_local_dir=local_dir)

    def get(folder, group):
        settings = CacheBuildSettings(device=torch.device("cpu"), batch_size=8, progress=False, processes=group)
        return reuse_or_build_cache(model, 3, folder, config, images, settings, collate_fn=collate_image_batch)

    built, reused_first = get(url, processes)
    again, reused_second = get(url, processes)
    report = {
        "reused": [reused_first, reused_second],
        "num_processes": built.manifest.num_processes,
        "shards": built.manifest.shards,
        "rows": rows_digest(again),
        "local_entries": sorted(os.listdir(local_dir)),
        "read_from": again.folder,
    }
    if rank == 0:
        single, _ = get(os.path.join(local_dir, "single"), None)
        report["single_rows"] = rows_digest(single)
    with open(os.path.join(results, f"{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
