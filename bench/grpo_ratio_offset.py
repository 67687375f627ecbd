"""Flow-GRPO's log-ratio before any update: with identical weights, re-scoring a rollout's stored steps must give
log rho = 0. Reports the first micro-batch's mean |log rho| and clip fraction per trained step, in a given precision.

    python -m bench.grpo_ratio_offset --config configs/digits_even_grpo.yaml --mixed_precision bf16

Builds the run's trainer (no training), samples round 0, and scores the first micro-batch of ``train_batch_size``
samples with the objective's losses, without an optimizer step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Optional

from orw_diffusers.dtypes import MIXED_PRECISIONS


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpo_ratio_offset", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits_even_grpo.yaml")
    parser.add_argument("--mixed_precision", default="bf16", choices=tuple(MIXED_PRECISIONS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers.config import from_dict, load_yaml, validate
    from orw_diffusers.objectives.base import MicroBatch, slice_extras
    from orw_diffusers.sde import sde_step
    from orw_diffusers.trainer import Trainer

    values = {**load_yaml(args.config), "mixed_precision": args.mixed_precision, "output_dir": tempfile.mkdtemp()}
    cfg = from_dict(values)
    validate(cfg)
    trainer = Trainer(cfg)
    rollout = trainer.rollout(0)
    global_rewards = trainer.gather_global(rollout.rewards, rollout.indices)
    groups = torch.tensor([trainer.prompt_ids[p] for p in trainer.sample_prompts(0)])
    signal = trainer.objective.signal(global_rewards, groups).values[rollout.indices]
    rows = torch.arange(min(cfg.train_batch_size, len(rollout.indices)))
    batch = MicroBatch(0, 0, cfg.seed, rollout.indices[rows], rollout.latents[rows], signal[rows],
                       slice_extras(rollout.extras, rows, trainer.device))  # fmt: skip
    fields = trainer.training_fields(rollout.prompts[: len(rows)])
    print(f"{args.config}, mixed_precision {args.mixed_precision}: {len(rows)} samples, first micro-batch")
    print("| trained step | mean abs(log rho) | max abs(log rho) | clip fraction |")
    print("|---|---|---|---|")
    ex, gaps, clipped = batch.extras, [], []
    with torch.no_grad():
        for k in range(ex["step_latents"].shape[1]):  # the objective's own re-scoring, as its losses do it
            x, sigma = ex["step_latents"][:, k], ex["step_sigma"][:, k].to(trainer.device)
            step = sde_step(
                x, fields.policy(x, sigma), sigma, ex["step_sigma_next"][:, k].to(trainer.device), cfg.noise_level,
                ex["sigma_max"].to(trainer.device), next_latents=ex["step_next_latents"][:, k], sde_type=cfg.sde_type,
            )  # fmt: skip
            log_rho = (step.log_prob - ex["step_log_prob"][:, k].to(trainer.device)).abs()
            gaps.append(log_rho.mean().item())
            clipped.append(((log_rho.exp() - 1).abs() > cfg.clip_range).float().mean().item())
            print(f"| {k} | {gaps[-1]:.3g} | {log_rho.max().item():.3g} | {clipped[-1]:.3f} |")
    print(f"| mean | {sum(gaps) / len(gaps):.3g} | | {sum(clipped) / len(clipped):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
