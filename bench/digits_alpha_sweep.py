"""The W2 coefficient (alpha) sweep of the digits demo: reward vs diversity vs distance to the base.

    python -m bench.digits_alpha_sweep            # the full sweep, 3 seeds (~37 min on 2 CPU cores), writes docs/results.md
    python -m bench.digits_alpha_sweep --quick    # plumbing only: the mini base, 2 rounds per run, into a temp dir

Each run is the training entry point (``orw_diffusers.train``) on ``configs/digits_even.yaml`` with overrides (a
fresh process per run, ``--jobs`` at a time), then 500 samples of the fine-tuned pipeline through plain
diffusers (``load_lora_weights``), judged by ``digits.evaluate_images`` (an SVC the fine-tuning never saw).
Runs: every alpha x every seed, a reward-free control (uniform weights, alpha 0) and an odd-digits run
(``digit_in`` [1, 3, 5, 7, 9], whose target is not the base's over-represented "8").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import yaml

from bench import REPO
from bench.sweep import field_distance, finish_run, mini_digits_base, run_child_jobs, run_job_file, write_group_grids

CONFIG = os.path.join(REPO, "configs", "digits_even.yaml")
GRPO_CONFIG = os.path.join(REPO, "configs", "digits_even_grpo.yaml")
NFT_CONFIG = os.path.join(REPO, "configs", "digits_even_nft.yaml")
#: each objective's digits config
CONFIGS = {"orw_cfm_w2": CONFIG, "flow_grpo": GRPO_CONFIG, "diffusion_nft": NFT_CONFIG}
ODD_DIGITS = [1, 3, 5, 7, 9]
#: each target's classes (reward digit_even for "even", digit_in over the classes otherwise)
TARGET_DIGITS = {"even": [0, 2, 4, 6, 8], "odd": ODD_DIGITS, "three": [1, 4, 7]}
W2_LAST_ROUNDS = 20  # w2_loss is averaged over this many final rounds
GRID_SAMPLES = 48
PER_RUN_KEYS = ("pretrained_model_name_or_path", "output_dir", "seed", "w2_coefficient", "log_w2_distance",
                "weight_normalization", "reward")  # train_argv sets these for each run; --set may not


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
    orw = spec.objective == "orw_cfm_w2"
    values: dict[str, Any] = {"pretrained_model_name_or_path": base, "output_dir": out_dir, "seed": spec.seed}
    if orw:
        values.update(w2_coefficient=spec.alpha, log_w2_distance=True)
    values.update(**extra, **spec.overrides)
    if spec.uniform:
        values["weight_normalization"] = "uniform"
    values["reward"] = reward_spec(spec.target, base)
    argv = ["--config", CONFIGS[spec.objective]]
    for key, value in values.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return argv


# ------------------------------------------------------------------------------------------------
# One run (a child process): train through the real script, then sample and judge.
# ------------------------------------------------------------------------------------------------


def run_one(job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    spec = RunSpec(**job["spec"])
    out_dir = job["out_dir"]
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
    n = job["num_eval"]
    prompts = [digits.GENERIC_PROMPT] * n
    images = digits.generate_digits(pipe, prompts, seed=job["eval_seed"], num_inference_steps=job["eval_steps"])
    report = digits.evaluate_images(images)
    reward = build_reward(reward_spec(spec.target, job["base"]))
    last = rows[-W2_LAST_ROUNDS:]
    result = {
        "spec": asdict(spec), "report": report,
        "reward": reward(images, prompts).rewards.mean().item(),
        "w2_final": field_distance(last),
        "samples_seen": rows[-1]["samples_seen"], "rounds": len(rows),
        "round_seconds": sum(r["seconds"] for r in rows), "train_seconds": train_seconds,
        "reward_curve": [r["reward_mean"] for r in rows],
    }  # fmt: skip
    finish_run(out_dir, result, images[:GRID_SAMPLES])


# ------------------------------------------------------------------------------------------------
# The parent: schedule the runs, then write the table.
# ------------------------------------------------------------------------------------------------


def job_for(spec: RunSpec, args: argparse.Namespace, base: str, work: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"spec": asdict(spec), "base": base, "out_dir": os.path.join(work, spec.name), "extra": extra,
            "threads": args.threads, "num_eval": args.num_eval, "eval_seed": args.eval_seed,
            "eval_steps": args.eval_steps}  # fmt: skip


def run_all(runs: list[RunSpec], args: argparse.Namespace, base: str, work: str, extra: dict[str, Any]) -> list[dict]:
    jobs = [job_for(spec, args, base, work, extra) for spec in runs]
    return run_child_jobs(jobs, "bench.digits_alpha_sweep", args.jobs, {"HF_HUB_OFFLINE": "1"}, summary_line)


def target_share(result: dict) -> float:
    """The share of samples the SVC judges in the run's target classes (P(even) for the even runs and the control)."""
    r = result["report"]
    if result["spec"]["target"] == "even":
        return r["p_even"]
    return sum(r["histogram"][d] for d in TARGET_DIGITS[result["spec"]["target"]])


def target_entropy(result: dict) -> float:
    import torch

    from orw_diffusers.digits import subset_entropy

    r = result["report"]
    if result["spec"]["target"] != "even":
        return subset_entropy(torch.tensor(r["histogram"]), tuple(TARGET_DIGITS[result["spec"]["target"]]))
    return max(0.0, r["even_entropy"])  # results written before subset_entropy may hold -0.0


def summary_line(result: dict) -> str:
    r = result["report"]
    return (f"P(target) {target_share(result):.3f}, entropy {target_entropy(result) / math.log(5):.2f} ln5, "
            f"rel. confident {r['relative_confident_share']:.2f}, w2 {result['w2_final']:.4f}")


def fmt_hist(histogram: list[float]) -> str:
    return " ".join(f"{round(100 * h)}" for h in histogram)


def write_grids(results: list[dict], base_images: Any, img_dir: str, work: str) -> dict[str, str]:
    """One grid per group (its first seed), plus the base; returns group -> file name."""
    from orw_diffusers.images import image_grid, save_image

    def write(images: Any, path: str) -> None:
        save_image(image_grid(images[:GRID_SAMPLES], ncols=16, min_tile=32, pad=1), path)

    os.makedirs(img_dir, exist_ok=True)
    files = {}
    if base_images is not None:
        write(base_images, os.path.join(img_dir, "digits_base.png"))
        files["base"] = "digits_base.png"
    return write_group_grids(results, work, img_dir, "digits_", write, files)


def check_targets(groups: dict[str, list[dict]]) -> list[str]:
    """The sweep's targets, each as 'MET'/'MISSED' plus the numbers behind it."""
    ln5 = math.log(5)
    mean = statistics.fmean
    alphas = sorted({r["spec"]["alpha"] for rs in groups.values() for r in rs
                     if r["spec"]["target"] == "even" and not r["spec"]["uniform"]})
    by_alpha = {a: [r for rs in groups.values() for r in rs if r["spec"]["alpha"] == a
                    and r["spec"]["target"] == "even" and not r["spec"]["uniform"]] for a in alphas}
    p = {a: mean(target_share(r) for r in rs) for a, rs in by_alpha.items()}
    h = {a: mean(target_entropy(r) for r in rs) / ln5 for a, rs in by_alpha.items()}
    w2 = {a: mean(r["w2_final"] for r in rs) for a, rs in by_alpha.items()}
    rcs = {a: mean(r["report"]["relative_confident_share"] for r in rs) for a, rs in by_alpha.items()}
    out = []
    if 0.0 in p:
        ok = p[0.0] >= 0.97 and h[0.0] <= 0.5
        out.append(f"{'MET' if ok else 'MISSED'}: alpha = 0 collapses (P(even) >= 0.97 and entropy <= 0.5 ln5): "
                   f"P(even) {p[0.0]:.3f}, entropy {h[0.0]:.2f} ln5")
    if len(alphas) > 1:
        ok = all(w2[a] > w2[b] for a, b in zip(alphas, alphas[1:]))
        out.append(f"{'MET' if ok else 'MISSED'}: W2 falls monotonically as alpha grows: "
                   + ", ".join(f"{a:g}: {w2[a]:.4f}" for a in alphas))
        ok = all(h[a] <= h[b] for a, b in zip(alphas, alphas[1:]))
        out.append(f"{'MET' if ok else 'MISSED'}: the even-class entropy rises with alpha: "
                   + ", ".join(f"{a:g}: {h[a]:.2f}" for a in alphas))
    for a in alphas:
        ok = p[a] >= 0.95 and h[a] >= 0.85 and rcs[a] >= 0.8
        out.append(f"{'met' if ok else 'not met'} at alpha = {a:g}: the demo targets (P(even) >= 0.95, entropy >= 0.85 ln5, "
                   f"relative confident share >= 0.8): {p[a]:.3f}, {h[a]:.2f} ln5, {rcs[a]:.2f}")
    return out


def write_results(results: list[dict], base_report: Optional[dict], grids: dict[str, str], path: str,
                  command: str, settings: str) -> None:
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(result["spec"]["group"], []).append(result)
    ln5 = math.log(5)
    lines = [
        "# Digits demo: results of the alpha sweep", "",
        "The paper's MNIST \"only even digits\" experiment in miniature: the CPU digits base (a real "
        "`StableDiffusion3Pipeline`, `orw_diffusers/digits/`) fine-tuned with LoRA by ORW-CFM-W2 towards the "
        "reward `digit_even` = P(even) of a small CNN. Every number below is judged by a *different* classifier "
        "(an SVC on pixels, `digits.evaluate_images`) on samples of the fine-tuned pipeline drawn with plain "
        "diffusers (`load_lora_weights`), the generic prompt only.", "",
        f"Reproduce: `{command}`", "", f"Settings: {settings}", "",
        "Columns: **P(target)** = share judged even (odd for the odd run); **entropy** = entropy of the class "
        "distribution within the target classes, in units of ln 5 (1 = all five equally often); **rel. conf.** = "
        "share of samples the judge is >= 90% sure of, relative to real held-out digits (drift and blur lower it); "
        "**W2** = mean ||v_ft - v_ref||^2 over the last 20 rounds (`w2_loss`, a bound on the W2 distance to the base); "
        "**queries** = reward queries = samples generated (`samples_seen`); **time** = wall time of training.", "",
        "| run | seeds | P(target) | entropy (ln5) | rel. conf. | W2 | histogram 0..9 (%) | queries | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if base_report is not None:
        lines.append(f"| base (no fine-tuning) | - | {base_report['p_even']:.3f} | "
                     f"{base_report['even_entropy'] / ln5:.2f} | {base_report['relative_confident_share']:.2f} | 0 | "
                     f"{fmt_hist(base_report['histogram'])} | 0 | 0 |")
    for group, rs in groups.items():
        mean = statistics.fmean
        hist = [mean(r["report"]["histogram"][d] for r in rs) for d in range(10)]
        lines.append(
            f"| {group} | {len(rs)} | {mean(target_share(r) for r in rs):.3f} | {mean(target_entropy(r) for r in rs) / ln5:.2f} | "
            f"{mean(r['report']['relative_confident_share'] for r in rs):.2f} | {mean(r['w2_final'] for r in rs):.4f} | "
            f"{fmt_hist(hist)} | {rs[0]['samples_seen']} | {mean(r['train_seconds'] for r in rs):.0f} |"
        )
    lines += ["", "Per seed:", "", "| run | P(target) | entropy (ln5) | rel. conf. | W2 | histogram 0..9 (%) | final reward (CNN) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['spec']['name']} | {target_share(r):.3f} | {target_entropy(r) / ln5:.2f} | "
                     f"{r['report']['relative_confident_share']:.2f} | {r['w2_final']:.4f} | "
                     f"{fmt_hist(r['report']['histogram'])} | {r['reward']:.3f} |")
    lines += ["", "## Samples", "", "48 samples of each fine-tuned pipeline (its first seed), same noise for every run.", ""]
    for group, name in grids.items():
        lines += [f"**{group}**", "", f"![{group}](img/{name})", ""]
    lines += ["## Targets (checked by the script)", ""] + [f"- {t}" for t in check_targets(groups)]
    # the discussion is written by hand: keep the one already in the file
    discussion = "<!-- discussion: written by hand, kept when the script rewrites this file -->\n"
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if "\n## Discussion\n" in old:
            discussion = old.split("\n## Discussion\n", 1)[1].lstrip("\n")
    lines += ["", "## Discussion", "", discussion]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digits_alpha_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="mini base in a temp cache, 2 rounds, 16 eval samples")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--control_seeds", type=int, nargs="+", default=[0], help="seeds of the control and the odd run")
    parser.add_argument("--odd_alpha", type=float, default=None, help="alpha of the odd run (default: the config's)")
    parser.add_argument("--num_epochs", type=int, default=None, help="rounds per run (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override for every run, e.g. --set sampling_solver=heun (repeatable)")
    parser.add_argument("--num_eval", type=int, default=500)
    parser.add_argument("--eval_seed", type=int, default=1234)
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work_dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--base", default=None, help="the digits base to fine-tune (default: the cached one; "
                        "with --quick: a mini base built in the work dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "results.md"))
    parser.add_argument("--img_dir", default=None, help="default: img/ next to --output")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite --output and the grids from --work_dir's sweep_results.json, training nothing")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one job file
    args = parser.parse_args(argv)
    from orw_diffusers.config import from_dict, load_yaml
    from orw_diffusers.errors import ConfigError

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY a training config key")
        if key in PER_RUN_KEYS:
            parser.error(f"--set {item!r}: the sweep sets {key} for each run ({', '.join(PER_RUN_KEYS)})")
        overrides[key] = yaml.safe_load(value)
    try:  # unknown keys and wrong types, as the training script would report them
        from_dict(overrides)
    except ConfigError as e:
        parser.error(f"--set: {e}")
    if args.one:
        return run_job_file(args.one, run_one)

    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers import digits

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-sweep-")
    extra: dict[str, Any] = {}
    base = args.base
    if args.quick:  # one alpha, one seed, the control and the odd run: 3 runs of 2 tiny rounds, all at once
        base = base or mini_digits_base(work)
        extra = {"num_epochs": 2, "images_per_prompt": 4, "sample_batch_size": 4, "train_batch_size": 4,
                 "num_sampling_steps": 2}
        args.num_eval, args.eval_steps, args.jobs = 16, 2, 3
        args.alphas, args.seeds, args.control_seeds = args.alphas[:1], args.seeds[:1], args.control_seeds[:1]
        if argv is None or "--output" not in argv:  # a plumbing run never rewrites docs/
            args.output = os.path.join(work, "results.md")
    base = base or digits.ensure_digits_base()
    if args.num_epochs:
        extra["num_epochs"] = args.num_epochs
    extra.update(overrides)
    config = from_dict({**load_yaml(CONFIG), **extra}).to_dict()  # every run's settings before its alpha and seed
    start = time.perf_counter()
    if args.report_only:
        with open(os.path.join(work, "sweep_results.json")) as f:
            saved = json.load(f)
        results, base_report, runs = saved["results"], saved["base"], saved["results"]
        base_images = torch.load(os.path.join(work, "base_grid.pt"))
        config, args.num_eval, args.eval_steps, args.eval_seed, rounds = (
            from_dict(saved["config"]).to_dict(), saved["num_eval"], saved["eval_steps"], saved["eval_seed"],
            saved["rounds"])  # from_dict: a sweep saved before a config key existed reads with its default
        command = saved["command"]
    else:
        odd_alpha = args.odd_alpha if args.odd_alpha is not None else float(config["w2_coefficient"])
        runs = plan_runs(args.alphas, args.seeds, args.control_seeds, odd_alpha)
        print(f"{len(runs)} runs, {args.jobs} at a time, in {work}", flush=True)
        results = run_all(runs, args, base, work, extra)
        pipe = digits.load_digits_pipeline(base)
        base_images = digits.generate_digits(pipe, [digits.GENERIC_PROMPT] * args.num_eval, seed=args.eval_seed,
                                             num_inference_steps=args.eval_steps)
        base_report = digits.evaluate_images(base_images)
        torch.save(base_images[:GRID_SAMPLES], os.path.join(work, "base_grid.pt"))
        rounds = config["num_epochs"]
        command = "python -m bench.digits_alpha_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(work, "sweep_results.json"), "w") as f:
            json.dump({"results": results, "base": base_report, "config": config, "num_eval": args.num_eval,
                       "eval_steps": args.eval_steps, "eval_seed": args.eval_seed, "rounds": rounds,
                       "command": command.strip()}, f)
    img_dir = args.img_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "img")
    grids = write_grids(results, base_images, img_dir, work)
    settings = (f"`configs/digits_even.yaml` ({rounds} rounds of {config['images_per_prompt']} samples, "
                f"temperature {config['temperature']:g}, LoRA rank {config['rank']}, lr {config['learning_rate']:g}, "
                f"{config['num_sampling_steps']} {config['sampling_solver']} sampling steps) "
                f"with `w2_coefficient` = alpha; evaluation: "
                f"{args.num_eval} samples, {args.eval_steps} steps, guidance {digits.DIGITS_GUIDANCE_SCALE:g}, seed {args.eval_seed}")
    write_results(results, base_report, grids, args.output, command.strip(), settings)
    print(f"{len(results)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s; wrote {args.output} "
          f"and {len(grids)} grids to {img_dir}; raw results: {work}/sweep_results.json")
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
