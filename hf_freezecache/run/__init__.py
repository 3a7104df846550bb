"""Whole runs, shared by the recipes and the `hf-freezecache` command line: arguments, training, cache building."""

from .arguments import (
    RECIPE_DEFAULTS,
    DataTrainingArguments,
    ModelArguments,
    RunArguments,
    config_file_flags,
    expand_config_file,
    parse_run_arguments,
    run_argument_parser,
)
from .build_cache import CacheBuildArguments, parse_build_arguments, run_build_cache
from .train import run_training

__all__ = [
    "RECIPE_DEFAULTS",
    "CacheBuildArguments",
    "DataTrainingArguments",
    "ModelArguments",
    "RunArguments",
    "config_file_flags",
    "expand_config_file",
    "parse_build_arguments",
    "parse_run_arguments",
    "run_argument_parser",
    "run_build_cache",
    "run_training",
]
