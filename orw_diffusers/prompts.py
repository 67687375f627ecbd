"""Training prompts from the config: an inline list, a file (.txt/.jsonl/.csv) or a `datasets` dataset."""

from __future__ import annotations

import csv
import json
import os
from typing import TYPE_CHECKING

import torch

from . import streams
from .errors import ConfigError
from .flow import sample_generator

if TYPE_CHECKING:
    from .config import TrainConfig


def _error(msg: str) -> Exception:
    return ConfigError(msg)


def _read_prompt_file(path: str, column: str) -> list[str]:
    if not os.path.isfile(path):
        raise _error(f"prompt_file: {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    if ext == ".jsonl":
        prompts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if column not in row:
                    raise _error(f"prompt_column: {column!r} is missing on line {n} of {path!r}")
                prompts.append(str(row[column]))
        return prompts
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise _error(f"prompt_column: {column!r} is not a column of {path!r} (columns: {reader.fieldnames})")
            return [row[column] for row in reader]
    raise _error(f"prompt_file: {path!r} must end in .txt, .jsonl or .csv")


def _read_prompt_dataset(name: str, split: str, column: str) -> list[str]:
    import datasets

    if os.path.isfile(name):  # a local data file: let `datasets` pick the builder from the extension
        ext = os.path.splitext(name)[1].lstrip(".").lower()
        builder = {"jsonl": "json", "txt": "text"}.get(ext, ext)
        ds = datasets.load_dataset(builder, data_files={split: name}, split=split)
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise _error(f"prompt_column: {column!r} is not a column of {name!r} (columns: {ds.column_names})")
    return [str(p) for p in ds[column]]


def load_prompts(cfg: "TrainConfig") -> list[str]:
    """All training prompts, in file order. Exactly one source must be set."""
    sources = [k for k in ("prompts", "prompt_file", "prompt_dataset") if getattr(cfg, k)]
    if not sources and getattr(cfg, "model_factory", None):
        return [""]  # a plain velocity model: one empty prompt (unused by an unconditional model)
    if len(sources) != 1:
        got = ", ".join(sources) if sources else "none"
        raise _error(f"prompts: set exactly one of prompts, prompt_file, prompt_dataset (got {got})")
    if cfg.prompts:
        prompts = [str(p) for p in cfg.prompts]
    elif cfg.prompt_file:
        prompts = _read_prompt_file(cfg.prompt_file, cfg.prompt_column)
    else:
        prompts = _read_prompt_dataset(cfg.prompt_dataset, cfg.prompt_split, cfg.prompt_column)
    if not prompts:
        raise _error(f"{sources[0]}: no prompts found")
    return prompts


def round_prompts(prompts: list[str], seed: int, round_idx: int, per_round: int) -> list[str]:
    """Round ``round_idx``'s ``per_round`` prompts: a cursor over seeded per-pass permutations of ``prompts``.

    Depends only on ``(seed, round)``, so a resumed run draws the same prompts.
    """
    n, out = len(prompts), []
    for pos in range(round_idx * per_round, (round_idx + 1) * per_round):
        perm = torch.randperm(n, generator=sample_generator(seed, streams.PROMPT_ORDER, pos // n))
        out.append(prompts[int(perm[pos % n])])
    return out
