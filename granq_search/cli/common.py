"""Flags and helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from granq_search.config import ExperimentConfig, load_config, parse_set_args
from granq_search.errors import GranqError
from granq_search.jsonutil import json_safe

__all__ = ["add_config_flags", "add_runtime_flags", "add_format_flag", "config_from_args", "emit_json",
           "set_threads", "DEFAULT_OUTPUT_DIR"]

DEFAULT_OUTPUT_DIR = "runs/search"
"""Where searches live (``--output-dir`` of search, searches and leaderboard)."""


def add_config_flags(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--config", default=default, metavar="FILE_OR_PRESET",
                   help=f"experiment config YAML, exported config, or preset name (default: {default})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted path, e.g. --set quant.act.bits=3 (repeatable)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")


def add_format_flag(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json")) -> None:
    p.add_argument("--format", choices=choices, default=choices[0],
                   help="output format; json prints one JSON document on stdout")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, parse_set_args(args.set))


def set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise GranqError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def emit_json(doc: Any) -> None:
    json.dump(json_safe(doc), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
