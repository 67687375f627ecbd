"""The digits demo: the paper's "only even digits" experiment, end to end on a CPU.

    python -m orw_diffusers.demo [--config configs/digits_even.yaml] [--output_dir outputs/digits-even]

1. builds (or reuses) the digits base, a real ``StableDiffusion3Pipeline`` (``orw_diffusers.digits``);
2. runs ``accelerate launch -m orw_diffusers.train --config configs/digits_even.yaml``;
3. samples the base and the fine-tuned pipeline from the same seeds with plain diffusers
   (``load_lora_weights``) and judges both with a classifier the fine-tuning never saw;
4. prints before -> after and writes ``before_after.png`` and ``curves.png`` into the output dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "digits_even.yaml")


def train(config: str, base: str, output_dir: str, extra: list[str], threads: int) -> float:
    """``accelerate launch`` of the real training script with ``threads`` torch threads; returns its wall time in seconds."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [
        accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "orw_diffusers.train", "--config", config,
        "--pretrained_model_name_or_path", base, "--output_dir", output_dir, *extra,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return time.perf_counter() - start


def summarise(before: dict, after: dict) -> str:
    """The before -> after table the demo prints."""
    ln5 = math.log(5)
    rows = [
        ("reward (digit_even, CNN)", f"{before['reward']:.3f}", f"{after['reward']:.3f}"),
        ("P(even) (judge: SVC)", f"{before['p_even']:.3f}", f"{after['p_even']:.3f}"),
        ("even-class entropy", f"{before['even_entropy']:.3f} ({before['even_entropy'] / ln5:.2f} ln5)",
         f"{after['even_entropy']:.3f} ({after['even_entropy'] / ln5:.2f} ln5)"),
        ("relative confident share", f"{before['relative_confident_share']:.2f}", f"{after['relative_confident_share']:.2f}"),
    ]
    lines = [f"{'':26}{'before':>20}  ->  {'after':<20}"]
    lines += [f"{name:26}{b:>20}  ->  {a:<20}" for name, b, a in rows]
    lines.append("class histogram (% of samples, digits 0..9):")
    for name, report in (("before", before), ("after", after)):
        lines.append(f"  {name:>6}  " + " ".join(f"{d}:{round(100 * h):>2}" for d, h in enumerate(report["histogram"])))
    return "\n".join(lines)


def before_after_grid(before: torch.Tensor, after: torch.Tensor, max_images: int = 32, ncols: int = 16) -> Any:
    """Rows of the base model's samples above as many rows of the fine-tuned model's, the same seed in
    each column, labelled "base" / "fine-tuned"; 16 px digits are enlarged to 64 px tiles."""
    from .images import image_grid

    ncols = min(ncols, len(before), len(after))
    n = min(max_images, len(before), len(after)) // ncols * ncols
    labels = ["base"] * (n // ncols) + ["fine-tuned"] * (n // ncols)
    return image_grid(torch.cat([before[:n], after[:n]]), ncols=ncols, min_tile=64, row_labels=labels)


def main(argv: Optional[list[str]] = None) -> int:
    from . import digits

    parser = argparse.ArgumentParser(prog="python -m orw_diffusers.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--output_dir", default=os.path.join("outputs", "digits-even"))
    parser.add_argument("--num_eval", type=int, default=500, help="samples judged before and after")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the evaluation samples")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the demo and of the training process (2 threads on 2 cores shared with another job ran ~20x slower)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to the training script
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    base = digits.ensure_digits_base()
    print(f"base model: {base} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = train(args.config, base, args.output_dir, extra, args.threads)

    from .card import read_metrics
    from .images import plot_curves, save_image
    from .rewards import build_reward

    reward = build_reward("digit_even")
    prompts = [digits.GENERIC_PROMPT] * args.num_eval
    pipe = digits.load_digits_pipeline(base)
    before = digits.generate_digits(pipe, prompts, seed=args.seed)
    pipe.load_lora_weights(args.output_dir)
    after = digits.generate_digits(pipe, prompts, seed=args.seed)
    results = {}
    for name, images in (("before", before), ("after", after)):
        results[name] = digits.evaluate_images(images)
        results[name]["reward"] = reward(images, prompts).rewards.mean().item()
    rows = read_metrics(args.output_dir)
    results["train_seconds"] = train_seconds
    results["round_seconds"] = sum(row["seconds"] for row in rows)
    results["samples_seen"] = rows[-1]["samples_seen"]
    print(f"\n{args.num_eval} samples of the generic prompt {digits.GENERIC_PROMPT!r} before and after fine-tuning "
          f"(same seeds, plain diffusers, {digits.DIGITS_NUM_STEPS} steps):")
    print(summarise(results["before"], results["after"]))

    save_image(before_after_grid(before, after), os.path.join(args.output_dir, "before_after.png"))
    plot_curves(rows, os.path.join(args.output_dir, "curves.png"),
                keys=("reward_mean", "eval/digit_judge_even_mean", "w2_loss"))  # the judge: when the config has it
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"fine-tuning: {len(rows)} rounds, {results['samples_seen']} reward queries, {results['round_seconds']:.0f} s "
        f"in the rounds ({train_seconds:.0f} s for the whole training process). Wrote {args.output_dir}/before_after.png (top: before, "
        f"bottom: after), {args.output_dir}/curves.png and demo_results.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
