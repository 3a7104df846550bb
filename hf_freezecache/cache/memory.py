"""Where training reads a cache from: `choose_memory` turns `--cache_memory` into device, host or disk."""

from __future__ import annotations

import os

import torch

from .reader import ActivationCache
from .resident import resident_bytes

MEMORY_MODES = ("auto", "device", "host", "disk")

# Shares of the free memory a cache may take under `auto`: the rest is the training's (activations, optimizer state,
# DataLoader workers).
_DEVICE_SHARE = 0.4
_HOST_SHARE = 0.4


def available_host_bytes() -> int:
    """Memory the system can still give this process (`MemAvailable`), or the physical memory where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_device_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free memory, or the host's for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()


def choose_memory(cache: ActivationCache, requested: str, device: torch.device) -> tuple[str, str]:
    """The memory mode to read `cache` with on `device`, and why.

    `device` holds every row unpacked (`ResidentChunks`): for codecs that decode on the device (lowbit, int8, fp16,
    bf16) that is the compressed form, for the others (zfp, none) the float32 values. `auto` takes `device` when
    that takes at most 40% of the device's free memory, else `host` (the stored payloads in process memory) when
    they take at most 40% of the free host memory, else `disk`.

    Raises:
        ValueError: `requested` is not a memory mode.
    """
    if requested not in MEMORY_MODES:
        raise ValueError(
            f"--cache_memory {requested!r} is not a memory mode; choose one of {', '.join(MEMORY_MODES)}."
        )
    if requested != "auto":
        return requested, "as requested"
    unpacked = resident_bytes(cache.field_lengths(), cache.num_chunks)
    form = "compressed" if cache.codec.device_decodable else "decoded"
    if unpacked <= _DEVICE_SHARE * available_device_bytes(device):
        return (
            "device",
            f"auto: {unpacked / 2**20:.0f} MB {form} fit {_DEVICE_SHARE:.0%} of the free {device.type} memory",
        )
    stored = cache.manifest.stored_bytes + cache.manifest.sidecar_bytes
    if stored <= _HOST_SHARE * available_host_bytes():
        return "host", f"auto: {unpacked / 2**20:.0f} MB {form} do not fit the {device.type} memory"
    return "disk", f"auto: {stored / 2**20:.0f} MB stored exceed {_HOST_SHARE:.0%} of the free host memory"
