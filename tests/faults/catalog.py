"""The hand-written faults: manifest edits that change how the data is used, renames, extra files, and swaps
between caches.

The semantic edits and the swaps are listed most telling first: a campaign takes them in this order the first time
round (so that a short slice covers their variety), then shuffled.
"""

from __future__ import annotations

from typing import Any

from .values import Path

#: `(label, [(field, value), ...])`: one semantic edit, all its fields written together.
Edit = tuple[str, list[tuple[Path, Any]]]


def semantic_edits(manifest: dict[str, Any]) -> list[Edit]:
    """Edits of the fields that say how the rows are decoded or used, each to a plausible but wrong value: sidecar
    channels and configuration, codec parameters, shapes of the same size, chunking, sample count, position, model
    identity and fingerprint; the first of each group first, then the second of each, and so on."""
    c, h, w = manifest["sample_shape"]
    samples = manifest["num_samples"]
    shapes = [s for s in ([h, c, w], [w, h, c], [c, h * w], [c * h * w], [c // 4, 2 * h, 2 * w]) if s != [c, h, w]]
    groups = [
        _channel_flip_edits(manifest),
        _codec_edits(manifest["codec"]),
        [(f"sample_shape {shape} (same size)", [(("sample_shape",), shape)]) for shape in shapes],
        [
            (
                f"chunk_size {chunk}, num_chunks to match",
                [(("chunk_size",), chunk), (("num_chunks",), -(-samples // chunk))],
            )
            for chunk in (2, 8, 3, samples)
        ],
        [
            ("position 2 (same shape)", [(("position",), 2)]),
            ("position 4", [(("position",), 4)]),
            ("position 6", [(("position",), 6)]),
        ],
        [
            ("model_num_blocks of resnet32", [(("model_num_blocks",), 15)]),
            ("source_model of another model", [(("source_model",), "resnet56")]),
            ("model_family", [(("model_family",), "vit")]),
            ("model_class", [(("model_class",), "ResNet")]),
            ("source_revision", [(("source_revision",), "0" * 40)]),
        ],
        [
            ("fingerprint part position", [(("fingerprint_parts", "position"), "6")]),
            ("fingerprint of another cache", [(("fingerprint",), "0123456789abcdef" * 2)]),
            ("fingerprint part prefix_weights", [(("fingerprint_parts", "prefix_weights"), "ab" * 32)]),
        ],
        [
            ("num_samples one fewer, same rows", [(("num_samples",), samples - 1)]),
            ("num_samples 32, same rows", [(("num_samples",), 32)]),
            ("dtype", [(("dtype",), "float16")]),
            ("format_version older", [(("format_version",), 1)]),
        ],
        _layout_edits(manifest),
    ]
    return [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]


def _channel_flip_edits(manifest: dict[str, Any]) -> list[Edit]:
    flip = manifest["sidecars"].get("channel-flip")
    if not flip:
        return []
    channels = flip["summary"]["channels"]
    count = manifest["sample_shape"][0]
    unselected = next(c for c in range(count) if c not in channels)
    where = ("sidecars", "channel-flip", "summary", "channels")
    array = ("sidecars", "channel-flip", "arrays", "flipped_channels")
    return [
        ("another selection of channels", [(where, sorted([unselected, *channels[1:]]))]),
        ("channels out of range", [(where, [*channels[:-1], count])]),
        ("channels reversed", [(where, channels[::-1])]),
        ("a channel twice", [(where, [channels[0], *channels[:-1]])]),
        ("one channel fewer", [(where, channels[:-1])]),
        ("gamma doubled", [(("sidecars", "channel-flip", "config", "gamma"), 0.5)]),
        ("calibration size", [(("sidecars", "channel-flip", "config", "calibration_size"), 16)]),
        ("sidecar array shape", [((*array, "shape"), [len(channels) + 1, *manifest["sample_shape"][1:]])]),
        ("sidecar array dtype", [((*array, "dtype"), "int32")]),
    ]


def _layout_edits(manifest: dict[str, Any]) -> list[Edit]:
    if manifest["layout"] != "parquet":
        return [("layout parquet", [(("layout",), "parquet")])]
    shards = manifest["shards"]
    renamed = {name.replace("data/train-", "data/test-"): digest for name, digest in shards.items()}
    return [
        ("split test, shard paths to match", [(("split",), "test"), (("shards",), renamed)]),
        ("layout arrow", [(("layout",), "arrow")]),
        ("shards in another order", [(("shards",), {n: shards[n] for n in reversed(shards)})]),
    ]


def _codec_edits(codec: dict[str, Any]) -> list[Edit]:
    name = codec["name"]
    if name == "zfp":
        return [
            ("zfp tolerance doubled", [(("codec", "tolerance"), codec["tolerance"] * 2)]),
            ("zfp reference_std doubled", [(("codec", "reference_std"), codec["reference_std"] * 2)]),
            ("zfp tolerance relative", [(("codec", "relative"), True)]),
            ("codec codebook", [(("codec",), {"name": "codebook"})]),
        ]
    if name == "codebook":
        return [
            ("codebook 4 bits", [(("codec", "bits"), 4)]),
            ("codebook entropy none", [(("codec", "entropy"), "none")]),
            ("codebook iterations 0", [(("codec", "iterations"), 0)]),
            ("codebook level 19", [(("codec", "level"), 19)]),
            ("codec lowbit, same bits", [(("codec",), {"name": "lowbit", "bits": 2, "entropy": "zstd", "level": 3})]),
        ]
    return [
        ("codec bf16", [(("codec",), {"name": "bf16"})]),
        ("codec none", [(("codec",), {"name": "none"})]),
        ("codec int8", [(("codec",), {"name": "int8"})]),
    ]


#: Swaps between caches: `(target, donor, mode)`. What is swapped:
#: - `shards`: the donor's data files replace the target's, the target's manifest is kept;
#: - `manifest`: the donor's manifest replaces the target's (`+sha`: with the target's `shards`), the data is kept;
#: - `cache`: the donor's whole folder replaces the target's (`+fingerprint`: with the target's `fingerprint` and
#:   `fingerprint_parts` in the manifest);
#: - `shard-exchange`: two of the target's shards exchange their contents.
#: Then `+sha` writes the swapped files' sha256 into the manifest (`shards`), and `+reseal` also every field the
#: library derives (`CacheManifest(...).to_dict()`, e.g. a seal): only what binds data to the manifest is left.
SWAPS = [
    ("fp16", "fp16-other-weights", "shards+sha+reseal"),  # same shape, same size: only the data differs
    ("codebook", "codebook-resnet32", "shards+sha+reseal"),  # another model, same shape
    ("codebook", "codebook-position-6", "shards+sha+reseal"),  # another position
    ("zfp-flip", "codebook", "shards+sha+reseal"),  # another codec
    ("parquet", "parquet-other-weights", "shards+sha+reseal"),
    ("fp16", "fp16-other-weights", "shards"),
    ("parquet", "parquet-other-weights", "manifest"),
    ("fp16", "fp16-other-weights", "shards+sha"),
    ("fp16", "fp16-other-weights", "cache+fingerprint+reseal"),
    ("codebook", "codebook", "shard-exchange+sha+reseal"),
    ("zfp-flip", "zfp-flip-other-weights", "shards+sha+reseal"),
    ("zfp-flip", "zfp-plain", "shards+sha+reseal"),  # no sidecar column
    ("codebook", "codebook-position-6", "manifest+sha+reseal"),
    ("parquet", "zfp-flip", "cache"),  # the Arrow cache in place of its own export: the same rows
    ("codebook", "codebook-resnet32", "shards+sha"),
    ("zfp-flip", "zfp-flip-other-weights", "shards+sha"),
    ("parquet", "parquet-other-weights", "shards+sha"),
    ("fp16", "fp16-other-weights", "manifest"),
    ("fp16", "fp16-other-weights", "manifest+sha"),
    ("fp16", "fp16-other-weights", "cache"),
    ("fp16", "fp16-other-weights", "cache+fingerprint"),
    ("codebook", "codebook-resnet32", "shards"),
    ("codebook", "codebook-resnet32", "cache+fingerprint+reseal"),
    ("codebook", "codebook-position-6", "cache+fingerprint+reseal"),
    ("codebook", "codebook", "shard-exchange+sha"),
    ("zfp-flip", "zfp-plain", "manifest+sha+reseal"),
    ("zfp-flip", "zfp-flip-other-weights", "cache+fingerprint+reseal"),
    ("parquet", "parquet-other-weights", "shards"),
    ("parquet", "parquet-other-weights", "cache+fingerprint+reseal"),
    ("parquet", "parquet", "shard-exchange+sha+reseal"),
]


def renames(target: str, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """`(file, new name)` renames in the target's folder (a shard to another shard's name exchanges the two)."""
    shards = list(manifest["shards"])
    moves = [
        (shards[0], shards[0] + ".bak"),
        ("freezecache_manifest.json", "freezecache_manifest.json.bak"),
        ("README.md", "README.txt"),
    ]
    if len(shards) > 1:
        moves.append((shards[0], shards[-1]))
    if manifest["layout"] == "parquet":
        moves += [("data", "Data"), (shards[0], shards[0].replace("data/train-", "data/test-"))]
    else:
        moves += [("state.json", "state.json.old"), ("dataset_info.json", "info.json")]
    return moves


#: Unexpected files added to a cache folder: `(what, where)`; `where` may name a shard pattern, `{shard}` (a copy of
#: the first shard under another name) or `{parent}` (beside the folder).
EXTRA_FILES = [
    ("junk", "data-00009-of-00010.arrow"),
    ("junk", "data/train-00009-of-00010.parquet"),
    ("copy-of-shard", "{shard}.copy"),
    ("pickle", "evil.pkl"),
    ("manifest-copy", "nested/freezecache_manifest.json"),
    ("symlink", "data-00099-of-00100.arrow"),
    ("sparse-1GiB", "blob.bin"),
    ("partial-build", "{parent}"),
]
