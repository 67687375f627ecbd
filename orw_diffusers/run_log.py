"""What a run writes besides its weights: ``config.yaml``, ``prompts.txt``, ``metrics.jsonl``,
``rewards.jsonl``, sample and validation grids under ``samples/``, and the trackers' copies.

A resumed run cuts the per-round logs back to the rounds before its checkpoint and rewrites the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional

import torch

from .config import TrainConfig, save_yaml
from .images import image_grid, save_image


class RunLog:
    """Main-process writes (every method may be called on every process; the others do nothing)."""

    def __init__(self, cfg: TrainConfig, accelerator: Any, prompt_ids: dict[str, int]):
        self.cfg = cfg
        self.accelerator = accelerator
        self.prompt_ids = prompt_ids  # unique training prompt -> its line in prompts.txt
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.samples_dir = os.path.join(cfg.output_dir, "samples")
        self.main = accelerator.is_main_process

    def prepare(self, start_round: int) -> None:
        """config.yaml, prompts.txt, the per-round logs cut back to the rounds before ``start_round``,
        and the trackers (a resumed run drops the TensorBoard events of the rounds it is about to redo)."""
        cfg, acc = self.cfg, self.accelerator
        if self.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            with open(os.path.join(cfg.output_dir, "prompts.txt"), "w") as f:
                f.writelines(p.replace("\n", " ") + "\n" for p in self.prompt_ids)
            truncate_jsonl(self.metrics_path, "epoch", start_round)
            truncate_jsonl(os.path.join(cfg.output_dir, "rewards.jsonl"), "epoch", start_round)
            truncate_jsonl(os.path.join(self.samples_dir, "validation.jsonl"), "rounds_trained", start_round)
        acc.wait_for_everyone()
        if cfg.report_to != "none":
            init_kwargs = {"tensorboard": {"purge_step": start_round}} if start_round else {}
            if cfg.tracker_run_name:
                init_kwargs["wandb"] = {"name": cfg.tracker_run_name}
            config = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers(cfg.tracker_project, config=config, init_kwargs=init_kwargs)

    def metrics(self, metrics: dict[str, Any]) -> None:
        """One row of metrics.jsonl, and its numbers to the trackers at step ``epoch``."""
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=int(metrics["epoch"]))

    def image(self, tag: str, image: Any, step: int) -> None:
        """A PIL image to every tracker that takes images (TensorBoard needs its layout spelled out)."""
        import numpy as np

        batch = np.asarray(image)[None]  # [1, H, W, 3] uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: batch}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: list(batch)}, step=step)

    def sample_grid(self, round_idx: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> Optional[str]:
        """Every ``sample_log_interval`` rounds: the main process's samples of the round with their prompt
        index and reward, to ``samples/round_XXXX.png`` (XXXX = round) and the tracker. The samples of
        one prompt sit side by side; each row is labelled with its prompts (``p<i>``: line i of prompts.txt)."""
        interval = self.cfg.sample_log_interval
        if not interval or round_idx % interval or not self.main:
            return None
        ids = [self.prompt_ids[p] for p in prompts[: len(images)]]
        order = sorted(range(len(ids)), key=ids.__getitem__)  # the samples of one prompt side by side
        ids, values = [ids[i] for i in order], rewards[order].tolist()
        counts = {i: ids.count(i) for i in ids}
        ncols = next(iter(counts.values())) if len(set(counts.values())) == 1 else 0  # one row per prompt
        ncols = ncols if 2 <= ncols <= 8 else math.ceil(math.sqrt(len(ids)))
        rows = [ids[r : r + ncols] for r in range(0, len(ids), ncols)]
        labels = [" ".join(f"p{i}" for i in dict.fromkeys(row)) for row in rows]
        captions = [f"p{i} r={r:.3g}" for i, r in zip(ids, values)]
        grid = image_grid(images[order], ncols=ncols, captions=captions, row_labels=labels)
        path = save_image(grid, os.path.join(self.samples_dir, f"round_{round_idx:04d}.png"))
        self.image("samples", grid, step=round_idx)
        return path

    def sample_rewards(self, round_idx: int, prompts: list[str], rewards: torch.Tensor, signal: torch.Tensor) -> None:
        """With ``log_sample_rewards``: every sample's prompt, reward and training signal, global order."""
        if not (self.cfg.log_sample_rewards and self.main):
            return
        row = {"epoch": round_idx, "prompts": prompts, "rewards": rewards.tolist(), "weights": signal.tolist()}
        with open(os.path.join(self.cfg.output_dir, "rewards.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def validation(self, rounds_done: int, images: torch.Tensor, rewards: torch.Tensor,
                   held_out: Optional[dict[str, float]] = None) -> None:  # fmt: skip
        """``samples/validation_XXXX.png`` (XXXX = rounds trained; rows labelled "base" or "N rounds"), a row
        of ``samples/validation.jsonl``, and both to the tracker at step ``rounds_done``. ``held_out``: the
        eval_reward means of the renders, name -> mean."""
        captions = [f"v{i} r={r:.3g}" for i, r in enumerate(rewards.tolist())]
        ncols = min(len(images), 8)
        label = "base" if rounds_done == 0 else f"{rounds_done} rounds"
        grid = image_grid(images, ncols=ncols, captions=captions, row_labels=[label] * math.ceil(len(images) / ncols))
        save_image(grid, os.path.join(self.samples_dir, f"validation_{rounds_done:04d}.png"))
        with open(os.path.join(self.samples_dir, "validation.jsonl"), "a") as f:
            row = {"rounds_trained": rounds_done, "rewards": rewards.tolist()}
            f.write(json.dumps({**row, "eval": held_out} if held_out else row) + "\n")
        self.image("validation", grid, step=rounds_done)
        numbers = {f"validation/eval/{name}_mean": mean for name, mean in (held_out or {}).items()}
        self.accelerator.log({"validation/reward_mean": rewards.mean().item(), **numbers}, step=rounds_done)


def truncate_jsonl(path: str, key: str, keep_below: int) -> None:
    """Keep the rows of a JSON-lines log whose ``key`` is below ``keep_below``; rewritten atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get(key, -1) < keep_below]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def reward_by_prompt(
    rewards: torch.Tensor, sample_prompts: list[str], prompt_ids: dict[str, int], max_prompts: int
) -> dict[str, float]:
    """``reward_by_prompt/<i>``: the mean reward [B] of each prompt of the round (i: line of ``prompts.txt``),
    for rounds with at most ``max_prompts`` unique prompts."""
    unique = sorted(set(sample_prompts), key=prompt_ids.__getitem__)
    if not 0 < len(unique) <= max_prompts:
        return {}
    out = {}
    for prompt in unique:
        mask = torch.tensor([p == prompt for p in sample_prompts])
        out[f"reward_by_prompt/{prompt_ids[prompt]}"] = rewards[mask].mean().item()
    return out


def quiet_logging() -> None:
    """Non-main processes: warnings and errors only, from us and from the libraries."""
    logging.getLogger("orw_diffusers").setLevel(logging.WARNING)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:  # the verbosity helpers are a nicety, not a requirement
        pass
