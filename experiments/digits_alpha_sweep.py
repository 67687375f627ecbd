"""The W2 coefficient (alpha) sweep of the digits demo: reward vs diversity vs distance to the base.

    python -m experiments.digits_alpha_sweep            # the full sweep, 3 seeds (~37 min on 2 CPU cores), writes docs/results.md
    python -m experiments.digits_alpha_sweep --quick    # plumbing only: the mini base, 2 rounds per run, into a temp dir

Each run is the training entry point (``orw_diffusers.train``) on ``configs/digits_even.yaml`` with overrides (a
fresh process per run, ``--jobs`` at a time), then 500 samples of the fine-tuned pipeline through plain
diffusers (``load_lora_weights``), judged by ``digits.evaluate_images`` (an SVC the fine-tuning never saw).
Runs: every alpha x every seed, a reward-free control (uniform weights, alpha 0) and an odd-digits run
(``digit_in`` [1, 3, 5, 7, 9], whose target is not the base's over-represented "8"), at the config's alpha.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from bench import REPO, markdown_table
from experiments.sweep import (alpha_checks, alpha_means, by_group, field_distance, finish_run, histogram_text,
                         mini_digits_base, parse_overrides, run_child_jobs, run_job_file, study_parser, target_stats,
                         write_group_grids,
                         write_section)  # fmt: skip

#: each objective's digits config
CONFIGS = {objective: os.path.join(REPO, "configs", f"digits_even{suffix}.yaml")
           for objective, suffix in (("orw_cfm_w2", ""), ("flow_grpo", "_grpo"), ("diffusion_nft", "_nft"))}  # fmt: skip
#: each target's classes (reward digit_even for "even", digit_in over the classes otherwise)
TARGET_DIGITS = {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9], "three": [1, 4, 7]}
GRID_SAMPLES = 48
PER_RUN_KEYS = ("pretrained_model_name_or_path", "output_dir", "seed", "w2_coefficient", "log_w2_distance",
                "weight_normalization", "reward")  # train_argv sets these for each run; --set may not
BEGIN = "<!-- digits_alpha_sweep: begin (written by python -m experiments.digits_alpha_sweep) -->"
END = "<!-- digits_alpha_sweep: end -->"
TITLE = "# Digits demo: results of the alpha sweep"


@dataclass
class RunSpec:
    name: str  # e.g. "alpha0.1-s0"
    group: str  # the table row it averages into, e.g. "alpha = 0.1"
    alpha: float
    seed: int
    target: str = "even"  # a key of TARGET_DIGITS
    uniform: bool = False  # the reward-free control
    overrides: dict[str, Any] = field(default_factory=dict)
    objective: str = "orw_cfm_w2"  # another objective: its config of CONFIGS, and alpha is not used


def plan_runs(alphas: list[float], seeds: list[int], control_seeds: list[int], odd_alpha: float) -> list[RunSpec]:
    runs = [RunSpec(f"alpha{a:g}-s{s}", f"alpha = {a:g}", a, s) for a in alphas for s in seeds]
    runs += [RunSpec(f"control-s{s}", "control: uniform weights, alpha = 0", 0.0, s, uniform=True) for s in control_seeds]
    runs += [RunSpec(f"odd-alpha{odd_alpha:g}-s{s}", f"odd digits, alpha = {odd_alpha:g}", odd_alpha, s, target="odd")
             for s in control_seeds]
    return runs


def reward_spec(target: str, base: str) -> list[dict[str, Any]]:
    """The run's reward, reading the CNN of ``base`` (not whatever base the default cache holds)."""
    if target != "even":
        return [{"name": "digit_in", "kwargs": {"digits": TARGET_DIGITS[target], "base_path": base}}]
    return [{"name": "digit_even", "kwargs": {"base_path": base}}]


def train_argv(spec: RunSpec, base: str, out_dir: str, extra: dict[str, Any]) -> list[str]:
    values: dict[str, Any] = {"pretrained_model_name_or_path": base, "output_dir": out_dir, "seed": spec.seed}
    if spec.objective == "orw_cfm_w2":
        values.update(w2_coefficient=spec.alpha, log_w2_distance=True)
    values.update(**extra, **spec.overrides)
    if spec.uniform:
        values["weight_normalization"] = "uniform"
    values["reward"] = reward_spec(spec.target, base)
    argv = ["--config", CONFIGS[spec.objective]]
    for key, value in values.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return argv


def run_one(job: dict[str, Any]) -> None:
    """The child: train through the real script, then sample with plain diffusers and judge."""
    import torch

    torch.set_num_threads(job["threads"])
    spec, out_dir = RunSpec(**job["spec"]), job["out_dir"]
    from orw_diffusers.train import main as train_main

    start = time.perf_counter()
    if train_main(train_argv(spec, job["base"], out_dir, job["extra"])) != 0:
        raise SystemExit(f"{spec.name}: training failed")
    train_seconds = time.perf_counter() - start

    from orw_diffusers import digits
    from orw_diffusers.hub import read_metrics
    from orw_diffusers.rewards import build_reward

    rows = read_metrics(out_dir)
    pipe = digits.load_digits_pipeline(job["base"])
    pipe.load_lora_weights(out_dir)
    prompts = [digits.GENERIC_PROMPT] * job["num_eval"]
    images = digits.generate_digits(pipe, prompts, seed=job["eval_seed"], num_inference_steps=job["eval_steps"])
    reward = build_reward(reward_spec(spec.target, job["base"]))
    result = {
        "spec": asdict(spec), "report": digits.evaluate_images(images),
        "reward": reward(images, prompts).rewards.mean().item(), "w2_final": field_distance(rows),
        "samples_seen": rows[-1]["samples_seen"], "rounds": len(rows),
        "round_seconds": sum(r["seconds"] for r in rows), "train_seconds": train_seconds,
        "reward_curve": [r["reward_mean"] for r in rows],
    }  # fmt: skip
    finish_run(out_dir, result, images[:GRID_SAMPLES])


def job_for(spec: RunSpec, args: argparse.Namespace, base: str, work: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"spec": asdict(spec), "base": base, "out_dir": os.path.join(work, spec.name), "extra": extra,
            "threads": args.threads, "num_eval": args.num_eval, "eval_seed": args.eval_seed,
            "eval_steps": args.eval_steps}  # fmt: skip


def stats(result: dict) -> tuple[float, float]:
    """(the SVC's share of the run's target classes, the entropy within them in units of ln 5)."""
    return target_stats(result["report"], TARGET_DIGITS[result["spec"]["target"]])


def summary_line(result: dict) -> str:
    (p, h), r = stats(result), result["report"]
    return (f"P(target) {p:.3f}, entropy {h:.2f} ln5, rel. confident {r['relative_confident_share']:.2f}, "
            f"w2 {result['w2_final']:.4f}")


def check_targets(results: list[dict]) -> list[str]:
    """The sweep's targets, each as 'MET'/'MISSED' plus the numbers behind it."""
    m = alpha_means([r for r in results if r["spec"]["target"] == "even" and not r["spec"]["uniform"]], stats)
    out = alpha_checks(m)
    for a, (p, h, c, _) in m.items():
        out.append(f"{'met' if p >= 0.95 and h >= 0.85 and c >= 0.8 else 'not met'} at alpha = {a:g}: the demo targets "
                   f"(P(even) >= 0.95, entropy >= 0.85 ln5, relative confident share >= 0.8): {p:.3f}, {h:.2f} ln5, "
                   f"{c:.2f}")  # fmt: skip
    return out


def section(results: list[dict], base_report: dict, grids: dict[str, str], command: str, settings: str) -> list[str]:
    """The body of the sweep's section of docs/results.md."""
    p, h = target_stats(base_report, TARGET_DIGITS["even"])
    rows = [["run", "seeds", "P(target)", "entropy (ln5)", "rel. conf.", "W2", "histogram 0..9 (%)", "queries",
             "time (s)"], ["base (no fine-tuning)", "-", f"{p:.3f}", f"{h:.2f}", f"{base_report['relative_confident_share']:.2f}",
                           "0", histogram_text(base_report["histogram"]), "0", "0"]]  # fmt: skip
    for group, rs in by_group(results).items():
        mean = statistics.fmean
        rows.append([group, str(len(rs)), f"{mean(stats(r)[0] for r in rs):.3f}", f"{mean(stats(r)[1] for r in rs):.2f}",
                     f"{mean(r['report']['relative_confident_share'] for r in rs):.2f}",
                     f"{mean(r['w2_final'] for r in rs):.4f}",
                     histogram_text([mean(r["report"]["histogram"][d] for r in rs) for d in range(10)]),
                     str(rs[0]["samples_seen"]), f"{mean(r['train_seconds'] for r in rs):.0f}"])  # fmt: skip
    seeds = [["run", "P(target)", "entropy (ln5)", "rel. conf.", "W2", "histogram 0..9 (%)", "final reward (CNN)"]]
    seeds += [[r["spec"]["name"], f"{stats(r)[0]:.3f}", f"{stats(r)[1]:.2f}", f"{r['report']['relative_confident_share']:.2f}",
               f"{r['w2_final']:.4f}", histogram_text(r["report"]["histogram"]), f"{r['reward']:.3f}"] for r in results]
    lines = [f"Reproduce: `{command}`", "", f"Settings: {settings}", "", *markdown_table(rows), "", "Per seed:", "",
             *markdown_table(seeds), "", "## Samples", "",
             "48 samples of each fine-tuned pipeline (its first seed), same noise for every run.", ""]  # fmt: skip
    for group, name in grids.items():
        lines += [f"**{group}**", "", f"![{group}](img/{name})", ""]
    return lines + ["## Targets (checked by the script)", "", *[f"- {t}" for t in check_targets(results)]]


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser("digits_alpha_sweep", __doc__, "the mini base, 2 rounds, 16 eval samples", [0, 1, 2], 500,
                          "sampling_solver=heun")  # fmt: skip
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.3])
    parser.add_argument("--control_seeds", type=int, nargs="+", default=[0], help="seeds of the control and the odd run")
    parser.add_argument("--num_epochs", type=int, default=None, help="rounds per run (default: the config's)")
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--base", default=None, help="the digits base to fine-tune (default: the cached one; "
                        "with --quick: a mini base built in the work dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "results.md"), help="grids go to img/ beside it")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.set, PER_RUN_KEYS)
    if args.one:
        return run_job_file(args.one, run_one)

    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers import digits
    from orw_diffusers.config import from_dict, load_yaml
    from orw_diffusers.images import image_grid, save_image

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-sweep-")
    extra: dict[str, Any] = {}
    if args.quick:  # one alpha, one seed, the control and the odd run: 3 runs of 2 tiny rounds, all at once
        args.base = args.base or mini_digits_base(work)
        extra = {"num_epochs": 2, "images_per_prompt": 4, "sample_batch_size": 4, "train_batch_size": 4,
                 "num_sampling_steps": 2}
        args.num_eval, args.eval_steps, args.jobs = 16, 2, 3
        args.alphas, args.seeds, args.control_seeds = args.alphas[:1], args.seeds[:1], args.control_seeds[:1]
        if argv is None or "--output" not in argv:  # a plumbing run never rewrites docs/
            args.output = os.path.join(work, "results.md")
    base = args.base or digits.ensure_digits_base()
    if args.num_epochs:
        extra["num_epochs"] = args.num_epochs
    extra.update(overrides)
    config = from_dict({**load_yaml(CONFIGS["orw_cfm_w2"]), **extra}).to_dict()  # the runs' settings before alpha, seed
    start = time.perf_counter()
    runs = plan_runs(args.alphas, args.seeds, args.control_seeds, float(config["w2_coefficient"]))
    print(f"{len(runs)} runs, {args.jobs} at a time, in {work}", flush=True)
    jobs = [job_for(spec, args, base, work, extra) for spec in runs]
    results = run_child_jobs(jobs, "experiments.digits_alpha_sweep", args.jobs, {"HF_HUB_OFFLINE": "1"}, summary_line)
    base_images = digits.generate_digits(digits.load_digits_pipeline(base), [digits.GENERIC_PROMPT] * args.num_eval,
                                         seed=args.eval_seed, num_inference_steps=args.eval_steps)  # fmt: skip
    base_report = digits.evaluate_images(base_images)
    command = ("python -m experiments.digits_alpha_sweep " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    with open(os.path.join(work, "sweep_results.json"), "w") as f:
        json.dump({"results": results, "base": base_report, "config": config, "num_eval": args.num_eval,
                   "eval_steps": args.eval_steps, "eval_seed": args.eval_seed, "command": command}, f)  # fmt: skip

    def write(images: Any, path: str) -> None:
        save_image(image_grid(images[:GRID_SAMPLES], ncols=16, min_tile=32, pad=1), path)

    img_dir = os.path.join(os.path.dirname(os.path.abspath(args.output)), "img")
    os.makedirs(img_dir, exist_ok=True)
    write(base_images, os.path.join(img_dir, "digits_base.png"))
    grids = write_group_grids(results, work, img_dir, "digits_", write, {"base": "digits_base.png"})
    settings = (f"`configs/digits_even.yaml` ({config['num_epochs']} rounds of {config['images_per_prompt']} samples, "
                f"temperature {config['temperature']:g}, LoRA rank {config['rank']}, lr {config['learning_rate']:g}, "
                f"{config['num_sampling_steps']} {config['sampling_solver']} sampling steps) with `w2_coefficient` = "
                f"alpha; evaluation: {args.num_eval} samples, {args.eval_steps} steps, guidance "
                f"{digits.DIGITS_GUIDANCE_SCALE:g}, seed {args.eval_seed}")  # fmt: skip
    write_section(args.output, BEGIN, END, TITLE, section(results, base_report, grids, command, settings))
    print(f"{len(results)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s; wrote {args.output} "
          f"and {len(grids)} grids to {img_dir}; raw results: {work}/sweep_results.json")
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
