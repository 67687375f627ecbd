"""ORW-CFM-W2 against Flow-GRPO on the digits base, with the same rewards, prompts, LoRA and reward queries.

    python -m bench.objective_comparison --seeds 0 1 2      # 2 objectives x 2 rewards x 3 seeds (~1 h on 2 cores)
    python -m bench.objective_comparison --quick            # plumbing only: the mini base, 2 rounds per run
    python -m bench.objective_comparison --objectives flow_grpo --set kl_type=exact   # one objective, a setting changed

ORW runs ``configs/digits_even.yaml`` and Flow-GRPO ``configs/digits_even_grpo.yaml`` (150 rounds of 32
samples each), through the real training script, one fresh process per run (``bench.digits_alpha_sweep``'s
runner). Rewards: ``digit_even`` and ``digit_in`` [1, 3, 5, 7, 9] (odd digits, away from the base's
over-represented 8). Each fine-tuned pipeline draws 500 samples with plain diffusers, judged by the SVC
the fine-tuning never saw. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from typing import Optional

import yaml

from bench.digits_alpha_sweep import RunSpec, run_all, target_entropy, target_share
from bench.sweep import mini_digits_base

OBJECTIVES = ("orw_cfm_w2", "flow_grpo")
TARGETS = ("even", "odd")


def first_reaching(curve: list[float], level: float, per_round: int) -> Optional[int]:
    """Reward queries until a round's mean reward first reaches ``level`` (None: never)."""
    return next(((i + 1) * per_round for i, r in enumerate(curve) if r >= level), None)


def table(results: list[dict], base: dict, level: float) -> str:
    rows = ["| objective | target | seeds | P(target) | entropy (ln5) | rel. conf. | W2 | time (s) | s / round | "
            f"queries to reward {level:g} |", "|---|---|---|---|---|---|---|---|---|---|"]
    import math

    for target in TARGETS:
        base_p = base["p_even"] if target == "even" else 1 - base["p_even"]
        rows.append(f"| base | {target} | - | {base_p:.3f} | | {base['relative_confident_share']:.2f} | 0 | | | |")
        for objective in OBJECTIVES:
            group = [r for r in results if r["spec"]["objective"] == objective and r["spec"]["target"] == target]
            if not group:
                continue
            mean = lambda values: statistics.fmean(values)  # noqa: E731
            per_round = group[0]["samples_seen"] // group[0]["rounds"]
            reached = [first_reaching(r["reward_curve"], level, per_round) for r in group]
            reached_text = ", ".join("never" if q is None else str(q) for q in reached)
            rows.append(
                f"| {objective} | {target} | {len(group)} | {mean([target_share(r) for r in group]):.3f} | "
                f"{mean([target_entropy(r) for r in group]) / math.log(5):.2f} | "
                f"{mean([r['report']['relative_confident_share'] for r in group]):.2f} | "
                f"{mean([r['w2_final'] for r in group]):.4f} | {mean([r['train_seconds'] for r in group]):.0f} | "
                f"{mean([r['round_seconds'] / r['rounds'] for r in group]):.2f} | {reached_text} |"
            )
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.objective_comparison", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the mini base, 2 rounds per run, 16 eval samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override for every run, e.g. --set kl_type=exact (repeatable)")
    parser.add_argument("--level", type=float, default=0.9, help="reward level for the queries column")
    parser.add_argument("--num_eval", type=int, default=500)
    parser.add_argument("--eval_seed", type=int, default=1234)
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--base", default=None, help="the digits base (default: the cached one)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers import digits

    work = args.work_dir or tempfile.mkdtemp(prefix="objective-comparison-")
    extra: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY a training config key")
        extra[key] = yaml.safe_load(value)
    base = args.base
    if args.quick:
        base = base or mini_digits_base(work)
        # 6 steps: room for the Flow-GRPO config's window of 4 stochastic steps
        extra |= {"num_epochs": 2, "images_per_prompt": 4, "sample_batch_size": 4, "train_batch_size": 4,
                  "num_sampling_steps": 6}  # fmt: skip
        args.num_eval, args.eval_steps, args.seeds = 16, 2, args.seeds[:1]
    base = base or digits.ensure_digits_base()
    runs = [
        RunSpec(f"{objective}-{target}-s{seed}", objective, 0.1, seed, target=target, objective=objective)
        for seed in args.seeds for target in args.targets for objective in args.objectives
    ]  # fmt: skip
    results = run_all(runs, args, base, work, extra)
    pipe = digits.load_digits_pipeline(base)
    images = digits.generate_digits(pipe, [digits.GENERIC_PROMPT] * args.num_eval, seed=args.eval_seed,
                                    num_inference_steps=args.eval_steps)  # fmt: skip
    print("python -m bench.objective_comparison " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(table(results, digits.evaluate_images(images), args.level))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
