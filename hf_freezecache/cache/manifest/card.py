"""The dataset card (`README.md`) of a cache, for either layout: YAML metadata, then the same in words."""

from __future__ import annotations

import json
from typing import Any

import yaml

from .schema import LAYOUT_PARQUET, CacheManifest


def card_metadata(manifest: CacheManifest) -> dict[str, Any]:
    """The `hf_freezecache` mapping of the card's YAML header: what the cache holds and how to decode it."""
    metadata = {
        "format_version": manifest.format_version,
        "fingerprint": manifest.fingerprint,
        "source_model": manifest.source_model,
        "source_revision": manifest.source_revision,
        "model_family": manifest.model_family,
        "model_class": manifest.model_class,
        "model_num_blocks": manifest.model_num_blocks,
        "position": manifest.position,
        "activation_shape": manifest.sample_shape,
        "activation_dtype": manifest.dtype,
        "codec": manifest.codec,
        "codec_error": manifest.codec_error,
        "chunk_size": manifest.chunk_size,
        "num_samples": manifest.num_samples,
        "num_rows": manifest.num_chunks,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "compression_ratio": manifest.compression_ratio,
        "sidecars": {
            name: {
                "config": sidecar["config"],
                "arrays": {
                    array: {"shape": spec["shape"], "dtype": spec["dtype"]}
                    for array, spec in sidecar["arrays"].items()
                },
            }
            for name, sidecar in manifest.sidecars.items()
        },
        "layout": manifest.layout,
    }
    # Through JSON like the manifest itself: tuples become lists, so YAML only ever sees plain types.
    return json.loads(json.dumps(metadata))


def dataset_card(manifest: CacheManifest) -> str:
    """The cache's dataset card (`README.md`), for either layout: YAML metadata, then the same in words.

    The YAML header has the card `tags`, the `hf_freezecache` mapping (`card_metadata`) and, in the Hub layout, the
    `configs` that point `datasets.load_dataset` at the parquet shards.
    """
    m = manifest
    title = f"Activation cache: {m.model_class} ({m.model_family}) at block position {m.position}"
    header: dict[str, Any] = {"pretty_name": title, "tags": ["hf_freezecache", "activation-cache"]}
    if m.layout == LAYOUT_PARQUET:
        data_files = [{"split": m.split, "path": f"data/{m.split}-*"}]
        header["configs"] = [{"config_name": "default", "data_files": data_files}]
    header["hf_freezecache"] = card_metadata(m)
    codec = ", ".join(f"{k}={v}" for k, v in m.codec.items() if k != "name")
    source = f"`{m.source_model}`" if m.source_model else "not recorded"
    if m.source_revision:
        source += f" (revision `{m.source_revision}`)"
    if m.layout == LAYOUT_PARQUET:
        where, layout = "<namespace>/<repo>", f"parquet shards `data/{m.split}-*`"
        rows = f'`datasets.load_dataset("<namespace>/<repo>", split="{m.split}")`'
    else:
        where, layout = "path/to/this/folder", "Arrow shards in the layout of `datasets.Dataset.save_to_disk`"
        rows = "`datasets.load_from_disk(folder)`"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"Outputs of the frozen prefix (the stem and blocks 0 to {m.position - 1}) of a {m.model_class}, "
        "compressed and written by hf_freezecache so that training can continue on the remaining blocks without "
        "running the prefix again.\n\n"
        "| field | value |\n|---|---|\n"
        f"| source model | {source} |\n"
        f"| fingerprint | `{m.fingerprint}` |\n"
        f"| samples / rows | {m.num_samples} / {m.num_chunks} (chunks of {m.chunk_size}) |\n"
        f"| activation shape per sample | {tuple(m.sample_shape)} {m.dtype} |\n"
        f"| codec | {m.codec['name']} ({codec or 'no parameters'}) |\n"
        f"| raw / stored bytes | {m.raw_bytes:,} / {m.stored_bytes:,} |\n"
        f"| compression ratio | {m.compression_ratio:.2f}x |\n"
        f"{_error_row(m)}"
        f"| build time | {m.build_seconds:.1f} s on {m.num_processes} process"
        f"{'es' if m.num_processes > 1 else ''} |\n"
        f"| built from | {m.source} |\n"
        f"| layout | {layout} (format version {m.format_version}) |\n"
        f"{_sidecar_rows(m)}\n"
        "Each row holds `data` (the encoded activations of `len(indices)` consecutive samples, shape "
        "`(len(indices), *sample_shape)`), `labels` and `indices` (row numbers in the training split)"
        f"{_sidecar_columns(m)}.\n\n"
        "## Loading\n\n"
        "```python\n"
        "from hf_freezecache import load_cache\n\n"
        f'cache = load_cache("{where}")  # checked (manifest, checksums, columns) before decoding\n'
        "chunk = cache.decode(0)  # float32 activations of the first row's samples\n"
        "```\n\n"
        f"The rows as they are stored: {rows}.\n\n"
        "## Training the rest of the model from it\n\n"
        f"Build the same {m.model_class} (its blocks from position {m.position} on are trained; the prefix "
        "is not needed), then feed it the cached activations:\n\n"
        "```python\n"
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from hf_freezecache import get_block_adapter\n"
        "from hf_freezecache.cache import CachedActivationDataset, ChunkShuffleSampler\n\n"
        "adapter = get_block_adapter(model)\n"
        "dataset = CachedActivationDataset(cache)\n"
        "loader = DataLoader(dataset, batch_size=128, sampler=ChunkShuffleSampler(dataset, 128))\n"
        "for batch in loader:\n"
        f'    logits = adapter.suffix(batch["prefix_activations"], {m.position})\n'
        '    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])\n'
        "    ...\n"
        "```\n"
    )


def _sidecar_rows(manifest: CacheManifest) -> str:
    rows = ""
    for name, sidecar in manifest.sidecars.items():
        options = ", ".join(f"{k}={v}" for k, v in sidecar["config"].items())
        stored = sum(spec["stored_bytes"] for spec in sidecar["arrays"].values())
        rows += f"| sidecar | {name} ({options}): {stored:,} bytes |\n"
        if "channels" in sidecar["summary"]:
            rows += f"| flip-sensitive channels | {sidecar['summary']['channels']} |\n"
    if manifest.sidecars:
        rows += f"| sidecars / cache | {manifest.sidecar_fraction:.1%} |\n"
    return rows


def _sidecar_columns(manifest: CacheManifest) -> str:
    if not manifest.sidecars:
        return ""
    columns = ", ".join(
        f"`sidecar.{name}` (shape `(len(indices), {', '.join(map(str, spec['shape']))})`, {spec['dtype']})"
        for name, spec in manifest.sidecar_arrays.items()
    )
    return f", and the augmentation sidecars {columns}; float32 arrays use the same codec as `data`"


def _error_row(m: CacheManifest) -> str:
    """The codec's measured error, as a card row (empty for caches built before it was recorded)."""
    if not m.codec_error:
        return ""
    e = m.codec_error
    return (
        f"| codec error (first {int(e['samples'])} samples) | max {e['max_over_std']:.3g} x std, RMS "
        f"{e['rms_over_std']:.3g} x std (std {e['std']:.3g}) |\n"
    )
