"""``python -m orw_diffusers.digits build|evaluate``: build the base into the cache, or print its quality report."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

import torch

from . import __doc__ as PACKAGE_DOC
from .base import ensure_digits_base, generate_digits, load_digits_pipeline
from .data import BASE_NAME, DIGITS_GUIDANCE_SCALE, DIGITS_NUM_STEPS, GENERIC_PROMPT, digits_cache_dir, specific_prompt
from .judge import CONFIDENCE_THRESHOLD, evaluate_images, judge_probs


def evaluate_base(path: Optional[str] = None, num_generic: int = 1000, num_per_digit: int = 100, seed: int = 0) -> dict:
    """Base-quality report: the generic prompt's ``evaluate_images`` plus per-digit accuracy of specific prompts."""
    pipe = load_digits_pipeline(path)
    report = {"generic": evaluate_images(generate_digits(pipe, [GENERIC_PROMPT] * num_generic, seed=seed))}
    prompts = [specific_prompt(d) for d in range(10) for _ in range(num_per_digit)]
    predicted = judge_probs(generate_digits(pipe, prompts, seed=seed + 1)).argmax(1)
    correct = predicted.view(10, num_per_digit) == torch.arange(10).view(10, 1)
    report["specific_accuracy"] = [round(a, 4) for a in correct.double().mean(1).tolist()]
    report["specific_accuracy_mean"] = correct.double().mean().item()
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orw_diffusers.digits", description=PACKAGE_DOC.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the base into the cache (no-op if it is there)")
    build.add_argument("--cache-dir", default=None, help="default: $ORW_DIFFUSERS_CACHE or ~/.cache/orw_diffusers")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="delete and rebuild an existing base")
    evaluate = sub.add_parser("evaluate", help="print the base-quality report")
    evaluate.add_argument("--path", default=None, help="a pipeline folder (default: the cached base)")
    evaluate.add_argument("--num-samples", type=int, default=1000, help="generic-prompt samples")
    evaluate.add_argument("--num-per-digit", type=int, default=100, help="samples per specific prompt")
    evaluate.add_argument("--seed", type=int, default=0)
    for command in (build, evaluate):
        command.add_argument("--threads", type=int, default=2,
                             help="torch CPU threads; on a CPU shared with other jobs 1 is often faster")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "build":
        path = os.path.join(digits_cache_dir(args.cache_dir), BASE_NAME)
        if args.force and os.path.isdir(path):
            shutil.rmtree(path)
        print(ensure_digits_base(args.cache_dir, seed=args.seed))
        return
    report = evaluate_base(args.path, args.num_samples, args.num_per_digit, args.seed)
    generic = report["generic"]
    print(f"generic prompt {GENERIC_PROMPT!r}, {generic['num_samples']} samples, "
          f"{DIGITS_NUM_STEPS} steps, guidance {DIGITS_GUIDANCE_SCALE}")
    print("  class histogram: " + " ".join(f"{d}:{h:.3f}" for d, h in enumerate(generic["histogram"])))
    print(f"  P(even) {generic['p_even']:.3f}   even-class entropy {generic['even_entropy']:.3f} (max 1.609)")
    print(f"  confident share (max-prob >= {CONFIDENCE_THRESHOLD}) {generic['confident_share']:.3f}, real held-out "
          f"{generic['real_confident_share']:.3f}, relative {generic['relative_confident_share']:.3f}")
    print("specific prompts, accuracy per digit: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(report["specific_accuracy"])))
    print(f"  mean {report['specific_accuracy_mean']:.3f}")
    print(json.dumps(report))

