"""Why the digits demo trades diversity for reward: what reweighting the base allows vs where fine-tuning moves it.

    python -m bench.digits_diagnostics --loras outputs/digits-even          # writes docs/digits_diagnostics.md
    python -m bench.digits_diagnostics --loras DIR_A DIR_B --labels "alpha 0" "alpha 0.1"

Two measurements, both judged by the SVC the fine-tuning never sees (``digits.judge_probs``):

1. **The reweighting bound.** Sample the base's generic prompt, score the samples with the run's reward
   (``digit_even`` of the base), and reweight them by ``exp(temperature * r)``: the judged class mix of the
   reweighted samples is what a fine-tune that only *reweights* the base (the exact reward-tilted target)
   would give, at any strength. If it reaches P(even) and entropy together, neither the base nor the
   reward is what stops the demo.
2. **Where the samples go.** Sample each fine-tuned LoRA from the *same* noise as the base and tabulate
   base class -> fine-tuned class: a reweighting keeps each kept sample's class, a transport moves them.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from typing import Optional

import torch

from bench.common import REPO
from bench.digits_alpha_sweep import fmt_hist
from orw_diffusers import digits
from orw_diffusers.checkpoint import LORA_WEIGHTS_NAME

TEMPERATURES = (5.0, 20.0, 80.0, 320.0)
LN5 = math.log(5)


def reweighting_bound(labels: torch.Tensor, rewards: torch.Tensor, temperature: float) -> dict:
    """Judged class mix of samples reweighted by ``exp(temperature * r)``. labels: long[N] in 0..9; rewards: [N]."""
    weights = torch.softmax(temperature * rewards.double(), dim=0)  # [N], sums to 1
    histogram = torch.zeros(10, dtype=torch.float64).index_add_(0, labels, weights)
    return {"temperature": temperature, "histogram": histogram.tolist(), "p_even": histogram[0::2].sum().item(),
            "even_entropy": digits.subset_entropy(histogram), "ess": (1.0 / (weights**2).sum()).item()}


def transition_matrix(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Row-normalised counts float64[10, 10]: row c = the classes (``after``) of the samples of class c (``before``).

    before, after: long[N] in 0..9, the same noise's class before and after; rows without samples are zero.
    """
    counts = torch.zeros(10, 10, dtype=torch.float64)
    counts.index_put_((before, after), torch.ones(len(before), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def report_markdown(command: str, bound: list[dict], base_counts: torch.Tensor, moves: list[dict]) -> str:
    """base_counts: long[10], the base's samples per judged class; moves[i]["matrix"]: a ``transition_matrix``."""
    num = int(base_counts.sum())
    base_hist = base_counts.double() / num
    lines = [
        "# Digits demo: diagnostics",
        "",
        f"Written by `{command}` ({num} samples of the generic prompt, {digits.DIGITS_NUM_STEPS} steps, guidance "
        f"{digits.DIGITS_GUIDANCE_SCALE:g}; classes by the judge, "
        "the SVC the fine-tuning never sees). The LoRAs are run folders of the alpha sweep "
        "(`python -m bench.digits_alpha_sweep --work_dir DIR` keeps them in DIR).",
        "",
        "## 1. What reweighting the base allows",
        "",
        "The base's samples reweighted by `exp(temperature * r)` with `r` = the `digit_even` reward of the base: "
        "the class mix an exact reward-tilted fine-tune would have (ESS: the effective number of samples left).",
        "",
        "| temperature | P(even) | entropy (ln5) | ESS | histogram 0..9 (%) |",
        "|---|---|---|---|---|",
        f"| base (0) | {base_hist[0::2].sum().item():.3f} | {digits.subset_entropy(base_hist) / LN5:.2f} | {num} | "
        f"{fmt_hist(base_hist.tolist())} |",
    ]
    for row in bound:
        lines.append(f"| {row['temperature']:g} | {row['p_even']:.3f} | {row['even_entropy'] / LN5:.2f} | "
                     f"{row['ess']:.0f} | {fmt_hist(row['histogram'])} |")
    lines += ["", "## 2. Where fine-tuning moves the base's samples", "",
              "Same noise before and after. Row: the base sample's class; columns: its class after fine-tuning (%). "
              "'kept' is the share of the base's even samples that stay in their own class."]
    for move in moves:
        lines += ["", f"**{move['label']}** (`{move['lora']}`): P(even) {move['p_even']:.3f}, entropy "
                  f"{move['even_entropy'] / LN5:.2f} ln5, kept {move['kept']:.2f}", "",
                  "| base class (n) | " + " | ".join(str(c) for c in range(10)) + " |",
                  "|---|" + "---|" * 10]
        for c in range(10):
            cells = fmt_hist(move["matrix"][c].tolist()).replace(" ", " | ")  # the same percentages, as cells
            lines.append(f"| {c} ({int(base_counts[c])}) | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digits_diagnostics", description=__doc__.split("\n")[0])
    parser.add_argument("--loras", nargs="*", default=[],
                        help=f"fine-tuned LoRA folders (with {LORA_WEIGHTS_NAME})")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per LoRA (default: the folder name)")
    parser.add_argument("--base", default=None, help="the digits base (default: the cached one)")
    parser.add_argument("--num", type=int, default=2000, help="samples of the generic prompt")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "digits_diagnostics.md"))
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.loras]
    if len(labels) != len(args.loras):
        parser.error(f"--labels: got {len(labels)} labels for {len(args.loras)} LoRAs")
    missing = [d for d in args.loras if not os.path.isfile(os.path.join(d, LORA_WEIGHTS_NAME))]
    if missing:
        parser.error(f"--loras: no {LORA_WEIGHTS_NAME} in {missing}")
    if args.num < 1 or args.threads < 1:
        parser.error(f"--num and --threads must be >= 1, got {args.num} and {args.threads}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"--output: the folder of {args.output!r} does not exist")
    if args.base and not os.path.isfile(os.path.join(args.base, "model_index.json")):
        parser.error(f"--base: {args.base!r} is not a saved pipeline (no model_index.json)")

    torch.set_num_threads(args.threads)
    from orw_diffusers.rewards import build_reward

    start = time.perf_counter()
    base = args.base or digits.ensure_digits_base()
    pipe = digits.load_digits_pipeline(base)
    prompts = [digits.GENERIC_PROMPT] * args.num
    images = digits.generate_digits(pipe, prompts, seed=args.seed)
    before = digits.judge_probs(images).argmax(1)
    rewards = build_reward([{"name": "digit_even", "kwargs": {"base_path": base}}])(images, prompts).rewards
    bound = [reweighting_bound(before, rewards, t) for t in args.temperatures]
    even = before % 2 == 0
    moves = []
    for lora, label in zip(args.loras, labels):
        pipe.load_lora_weights(lora)
        after = digits.judge_probs(digits.generate_digits(pipe, prompts, seed=args.seed)).argmax(1)
        pipe.unload_lora_weights()
        hist = torch.bincount(after, minlength=10).double() / args.num
        moves.append({"label": label, "lora": lora, "matrix": transition_matrix(before, after),
                      "p_even": hist[0::2].sum().item(), "even_entropy": digits.subset_entropy(hist),
                      "kept": (after[even] == before[even]).double().mean().item()})
    command = shlex.join(["python", "-m", "bench.digits_diagnostics", *(argv if argv is not None else sys.argv[1:])])
    with open(args.output, "w") as f:
        f.write(report_markdown(command, bound, torch.bincount(before, minlength=10), moves))
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
