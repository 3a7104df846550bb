"""Building an activation cache: a pipeline of small stages, each in its own module, run in this order.

- `prepare`: what every process agrees on first: the sample shape, the sidecars' calibration, the codec resolved on
  the first samples, the prefix's FLOPs;
- `batches`: each process's share of the samples (`process_share`), through the prefix, a batch at a time;
- `encode`: the batches cut into chunks, encoded on a thread pool into rows;
- `shards`: rows streamed into Arrow shards, written once, in the `save_to_disk` layout;
- `overlap`: a process's part: the prefix on the calling thread while earlier batches encode and a writer thread
  writes their rows;
- `gather`: the main process gathers the parts into one cache and writes its manifest;
- `staging`: the destination checks, the staging folder, and the rename that publishes the cache (or, for a URL,
  each process's upload of its part and the main process's publication on the store).

`pipeline.build_activation_cache` runs them; with several processes, each stage ends in a collective that stops
every process when one fails (`hf_freezecache._distributed.all_or_none`).
"""

from ..._distributed import ProcessGroup
from .batches import process_share
from .pipeline import build_activation_cache
from .prepare import prefix_forward_flops, prefix_in_eval
from .staging import check_destination, remove_partial_builds

__all__ = [
    "ProcessGroup",
    "build_activation_cache",
    "check_destination",
    "prefix_forward_flops",
    "prefix_in_eval",
    "process_share",
    "remove_partial_builds",
]
