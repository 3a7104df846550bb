"""Activation codecs: one file per family of codecs, all behind the `CODECS` registry.

A codec is described by a JSON-serialisable config, `{"name": ..., **params}`, which `ActivationCodec.config()`
returns and `build_codec` turns back into the codec: a cache manifest stores that dict to decode its shards.
"""

from __future__ import annotations

from typing import Any

from ..._registry import Registry
from .base import ActivationCodec, measure_codec_error

CODECS: Registry[ActivationCodec] = Registry("activation codec")
register_codec = CODECS.register


def build_codec(config: dict[str, Any]) -> ActivationCodec:
    """Builds the codec described by `config` (`{"name": "zfp", "tolerance": 0.05, ...}`, as `codec.config()`).

    Raises:
        `ValueError`: when the name is missing or unknown (listing the known codecs), or a parameter is invalid.
    """
    params = dict(config)
    if "name" not in params:
        raise ValueError(f"A codec config needs a 'name' ({', '.join(CODECS.names())}), got {config!r}.")
    codec_cls = CODECS.get(params.pop("name"))
    try:
        return codec_cls(**params)
    except TypeError as error:  # unexpected or missing parameters
        raise ValueError(f"Invalid parameters for the {codec_cls.name!r} activation codec: {error}.") from error


# After `build_codec`: the `budget` codec builds the codecs it chooses from.
from . import budget, codebook, int8, lowbit, raw, zfp  # noqa: E402, F401, I001

__all__ = ["CODECS", "ActivationCodec", "build_codec", "measure_codec_error", "register_codec"]
