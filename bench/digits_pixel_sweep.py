"""The paper's first experiment on the pixel digits base: full fine-tuning towards even digits, over alpha.

    python -m bench.digits_pixel_sweep            # 5 alphas + the reward-free control, 2 seeds, 2 runs at a time
    python -m bench.digits_pixel_sweep --quick    # plumbing only: the mini base, 2 rounds per run, into a temp dir
    python -m bench.digits_pixel_sweep --alphas 0 0.1 --no_control --w2_target 0.05 0.15 0.5 \
        --eval_reward digit_judge_even            # a W2 budget per target, and the held-out judge's alarm

Each run is the authors' API on our loop: ``ORWCFMTrainer`` on a fresh copy of the pixel base
(``digits.pixel.ensure_pixel_base``, unconditional), reward ``pixel_digit_reward(base, (0, 2, 4, 6, 8))``
(P(even) under the base's CNN), ``log_w2_distance: true`` so that ``w2_loss`` is measured at alpha 0 too.
Then 1000 samples of the fine-tuned weights (``checkpoint_dict()['net_model']``) are judged by
``digits.evaluate_images``, an SVC the fine-tuning never sees. The control trains with uniform weights
(``weight_normalization: uniform``, alpha 0): what the loop does without the reward.

The results go into their own section of docs/results.md (between the markers below, appended if
absent), and one grid of 64 samples per run group into docs/images/. With ``--w2_target`` (runs whose alpha
the W2 budget sets, starting at ``--w2_start``) or ``--eval_reward`` (a held-out judge and the reward-hacking
alarm in every run) the section is another one, "Staying close on the pixel base" (``GUARD_BEGIN``).
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
from typing import Any, Optional, Sequence

import yaml

from bench import REPO, markdown_table
from bench.sweep import (field_distance, finish_run, mean_spread, run_child_jobs, run_job_file, update_results,
                         write_group_grids)  # fmt: skip

EVEN = (0, 2, 4, 6, 8)
REWARDS = ("cnn", "robust_cnn")  # the training reward: P(even) under the base's CNN or the robust one
BEGIN = "<!-- digits_pixel_sweep: begin (written by python -m bench.digits_pixel_sweep) -->"
END = "<!-- digits_pixel_sweep: end -->"
W2_LAST_ROUNDS = 20  # w2_loss is averaged over this many final rounds
GRID_SIDE = 8  # grids of 8 x 8 samples
TARGETS = {"collapse_p": 0.97, "collapse_entropy": 0.5, "p": 0.95, "entropy": 0.85, "confident": 0.85, "seconds": 120}
GUARD_BEGIN = "<!-- digits_pixel_sweep guard: begin (written by python -m bench.digits_pixel_sweep --w2_target/--eval_reward) -->"
GUARD_END = "<!-- digits_pixel_sweep guard: end -->"
W2_TARGET_FACTOR = 1.5  # a W2 budget is met when the final W2 is within this factor of its target


@dataclass(frozen=True)
class Hyper:
    """Every run's fine-tuning settings (the bench's defaults are the tuned ones, docs/results.md)."""

    rounds: int = 1000  # original "steps": rounds of batch_size samples, one optimizer step each
    batch_size: int = 128
    learning_rate: float = 1e-4
    temperature: float = 20.0
    weight_normalization: str = "batch"  # ours: mean-1 weights, B * softmax(temperature * r)
    refresh: int = 1  # steps_per_epoch: the sampler (the original's last policy) is refreshed every round
    grad_clip: float = 1.0
    num_sampling_steps: int = 20
    clip_samples: bool = False  # true: rollouts clamped to the data range before they are scored and trained on
    policy: str = "full"  # or "lora": peft adapters on every Linear layer, the reference = adapters disabled
    rank: int = 8  # policy lora's rank
    eval_reward: str = ""  # a held-out judge (YAML reward spec, e.g. digit_judge_even); "": none
    hacking_window: int = 20  # the alarm's keys (used with eval_reward)
    hacking_min_rise: float = 0.0
    hacking_min_drop: float = 0.1
    w2_adapt_rate: float = 0.1  # the W2 budget's step (runs with a w2_target)
    reward: str = "cnn"  # the training reward: "cnn" (the base's CNN, easy to fool) or "robust_cnn"


@dataclass(frozen=True)
class RunSpec:
    name: str  # e.g. "alpha0.1-s0"
    group: str  # the table row it averages into
    alpha: float
    seed: int
    uniform: bool = False  # the reward-free control
    w2_target: Optional[float] = None  # a W2 budget: alpha (starting at ``alpha``) is the controller's
    objective: str = "orw_cfm_w2"  # another: ORW's keys (alpha, temperature, ...) are left out, ``overrides`` set
    classes: tuple[int, ...] = EVEN  # the reward: P(classes) under the base's CNN
    overrides: dict[str, Any] = field(default_factory=dict)  # more trainer config keys


def plan_runs(alphas: list[float], seeds: list[int], control: bool = True, w2_targets: Sequence[float] = (),
              start_alpha: float = 0.1) -> list[RunSpec]:  # fmt: skip
    runs = [RunSpec(f"alpha{a:g}-s{s}", f"alpha = {a:g}", a, s) for a in alphas for s in seeds]
    runs += [RunSpec(f"target{t:g}-s{s}", f"w2_target = {t:g}", start_alpha, s, w2_target=t)
             for t in w2_targets for s in seeds]  # fmt: skip
    if control:
        runs += [RunSpec(f"control-s{s}", "control: uniform weights, alpha = 0", 0.0, s, uniform=True) for s in seeds]
    return runs


def trainer_config(spec: RunSpec, hyper: Hyper, out_dir: str) -> dict[str, Any]:
    """The ``ORWCFMTrainer`` config of one run: the original's keys, plus a few of ours."""
    config = {
        "learning_rate": hyper.learning_rate,
        "warmup_steps": 0,
        "w2_coefficient": spec.alpha,
        "temperature": hyper.temperature,
        "grad_clip": hyper.grad_clip,
        "batch_size": hyper.batch_size,
        "savedir": out_dir,
        "weight_normalization": "uniform" if spec.uniform else hyper.weight_normalization,
        "log_w2_distance": True,
        "num_sampling_steps": hyper.num_sampling_steps,
        "clip_samples": hyper.clip_samples,
        "policy": hyper.policy,
        "rank": hyper.rank,
        "sample_log_interval": 0,
        "seed": spec.seed,
        "eval_reward": yaml.safe_load(hyper.eval_reward) if hyper.eval_reward else None,
        "hacking_window": hyper.hacking_window,
        "hacking_min_rise": hyper.hacking_min_rise,
        "hacking_min_drop": hyper.hacking_min_drop,
        "w2_target": getattr(spec, "w2_target", None),
        "w2_adapt_rate": hyper.w2_adapt_rate,
    }
    objective = getattr(spec, "objective", "orw_cfm_w2")
    if objective != "orw_cfm_w2":
        from orw_diffusers.objectives import objective_class

        config = {k: v for k, v in config.items() if k not in objective_class("orw_cfm_w2").config_keys}
        config["objective"] = objective
    return {**config, **getattr(spec, "overrides", {})}


# ------------------------------------------------------------------------------------------------
# One run: fine-tune through ORWCFMTrainer, then sample and judge.
# ------------------------------------------------------------------------------------------------


def fine_tune(config: dict[str, Any], base: str, reward_fn: Any, hyper: Hyper) -> tuple[Any, float]:
    """``ORWCFMTrainer`` on a fresh copy of the base -> (the fine-tuned model, wall seconds of ``train()``)."""
    from orw_diffusers.cfm import ORWCFMTrainer
    from orw_diffusers.digits.pixel import load_pixel_model

    trainer = ORWCFMTrainer(load_pixel_model(base).train(), config, "cpu", reward_fn=reward_fn)
    start = time.perf_counter()
    trainer.train(num_epochs=hyper.rounds // hyper.refresh, steps_per_epoch=hyper.refresh)
    train_seconds = time.perf_counter() - start
    tuned = load_pixel_model(base)
    tuned.load_state_dict(trainer.checkpoint_dict()["net_model"])
    return tuned, train_seconds


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import pixel_digit_reward, sample_pixel_digits, to_judge_images
    from orw_diffusers.hub import read_metrics

    torch.set_num_threads(job["threads"])
    spec, hyper, base, out_dir = RunSpec(**job["spec"]), Hyper(**job["hyper"]), job["base"], job["out_dir"]
    reward_fn = pixel_digit_reward(base, tuple(spec.classes), robust=hyper.reward == "robust_cnn")
    tuned, train_seconds = fine_tune(trainer_config(spec, hyper, out_dir), base, reward_fn, hyper)
    images = sample_pixel_digits(tuned, job["num_eval"], seed=job["eval_seed"], num_steps=hyper.num_sampling_steps)
    rows = read_metrics(out_dir)
    last = rows[-W2_LAST_ROUNDS:]
    result = {
        "spec": asdict(spec),
        "report": evaluate_images(to_judge_images(images)),
        "reward": reward_fn(images).mean().item(),  # the CNN's P(classes) on the evaluation samples
        "w2_final": field_distance(last),
        "alpha_final": rows[-1].get("w2_coefficient"),
        # the held-out judges' means over the last rounds, and the first round the alarm held (None: never)
        "eval_final": {k[len("eval/") : -len("_mean")]: statistics.fmean(r[k] for r in last)
                       for k in rows[-1] if k.startswith("eval/")},  # fmt: skip
        "alarm_round": next((r["epoch"] for r in rows if r.get("hacking_alarm")), None),
        "rounds": len(rows),
        "samples_seen": rows[-1]["samples_seen"],
        "train_seconds": train_seconds,
    }
    return finish_run(out_dir, result, images[: GRID_SIDE**2])


def job_for(spec: Any, args: argparse.Namespace, hyper: Hyper, base: str, work: str) -> dict[str, Any]:
    """The job file of one run (``spec``: a dataclass with a ``name``)."""
    out_dir = os.path.join(work, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    return {"spec": asdict(spec), "hyper": asdict(hyper), "base": base, "out_dir": out_dir, "threads": args.threads,
            "num_eval": args.num_eval, "eval_seed": args.eval_seed}  # fmt: skip


def run_jobs(runs: list[Any], args: argparse.Namespace, hyper: Hyper, base: str, work: str, module: str,
             run: Any, summary: Any) -> list[dict]:  # fmt: skip
    """``--jobs 1``: ``run(job)`` in this process, one after another; more: ``python -m module --one job``
    in that many child processes at a time. Results in the order of ``runs``."""
    jobs = [job_for(spec, args, hyper, base, work) for spec in runs]
    if args.jobs == 1:
        results = []
        for job in jobs:
            results.append(run(job))
            print(f"{job['spec']['name']}: {summary(results[-1])}", flush=True)
        return results
    results = run_child_jobs(jobs, module, args.jobs, {"OMP_NUM_THREADS": str(args.threads)}, summary)
    order = [spec.name for spec in runs]
    return sorted(results, key=lambda r: order.index(r["spec"]["name"]))


def run_all(runs: list[RunSpec], args: argparse.Namespace, hyper: Hyper, base: str, work: str) -> list[dict]:
    return run_jobs(runs, args, hyper, base, work, "bench.digits_pixel_sweep", run_one, summary_line)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def entropy_ln5(report: dict) -> float:
    return max(0.0, report["even_entropy"]) / math.log(5)


def summary_line(result: dict) -> str:
    r = result["report"]
    return (f"P(even) {r['p_even']:.3f}, entropy {entropy_ln5(r):.2f} ln5, rel. confident "
            f"{r['relative_confident_share']:.2f}, W2 {result['w2_final']:.4f}, {result['train_seconds']:.0f} s")


def group_stats(results: list[dict]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["spec"]["group"], []).append(r)
    stats = {}
    for group, rs in groups.items():
        stats[group] = {
            "alpha": rs[0]["spec"]["alpha"], "uniform": rs[0]["spec"]["uniform"], "seeds": len(rs),
            "p_even": [r["report"]["p_even"] for r in rs], "entropy": [entropy_ln5(r["report"]) for r in rs],
            "confident": [r["report"]["relative_confident_share"] for r in rs], "w2": [r["w2_final"] for r in rs],
            "reward": [r["reward"] for r in rs], "seconds": [r["train_seconds"] for r in rs],
            "histogram": [statistics.fmean(r["report"]["histogram"][d] for r in rs) for d in range(10)],
        }  # fmt: skip
    return stats


def table(stats: dict[str, dict[str, Any]], base_report: dict) -> list[list[str]]:
    rows = [["run", "seeds", "P(even)", "entropy (ln5)", "rel. conf.", "W2", "CNN reward", "histogram 0..9 (%)", "time (s)"]]
    rows.append(["base (no fine-tuning)", "-", f"{base_report['p_even']:.3f}", f"{entropy_ln5(base_report):.2f}",
                 f"{base_report['relative_confident_share']:.2f}", "0", "-",
                 " ".join(str(round(100 * h)) for h in base_report["histogram"]), "0"])  # fmt: skip
    for group, s in stats.items():
        rows.append([group, str(s["seeds"]), mean_spread(s["p_even"], 3), mean_spread(s["entropy"], 2),
                     mean_spread(s["confident"], 2), mean_spread(s["w2"], 4), mean_spread(s["reward"], 3),
                     " ".join(str(round(100 * h)) for h in s["histogram"]), mean_spread(s["seconds"], 0)])  # fmt: skip
    return rows


def per_seed_table(results: list[dict]) -> list[list[str]]:
    rows = [["run", "P(even)", "entropy (ln5)", "rel. conf.", "W2", "CNN reward", "histogram 0..9 (%)", "time (s)"]]
    for r in results:
        rep = r["report"]
        rows.append([r["spec"]["name"], f"{rep['p_even']:.3f}", f"{entropy_ln5(rep):.2f}",
                     f"{rep['relative_confident_share']:.2f}", f"{r['w2_final']:.4f}", f"{r['reward']:.3f}",
                     " ".join(str(round(100 * h)) for h in rep["histogram"]), f"{r['train_seconds']:.0f}"])  # fmt: skip
    return rows


def check_targets(stats: dict[str, dict[str, Any]], jobs: int = 2) -> tuple[list[str], dict[str, Any]]:
    """The experiment's targets, each 'MET'/'MISSED' with its numbers; and the headline results."""
    mean = statistics.fmean
    by_alpha = {s["alpha"]: s for s in stats.values() if not s["uniform"]}
    alphas = sorted(by_alpha)
    p = {a: mean(by_alpha[a]["p_even"]) for a in alphas}
    h = {a: mean(by_alpha[a]["entropy"]) for a in alphas}
    c = {a: mean(by_alpha[a]["confident"]) for a in alphas}
    w2 = {a: mean(by_alpha[a]["w2"]) for a in alphas}
    t = TARGETS
    lines, results = [], {"p_even": p, "entropy": h, "confident": c, "w2": w2}
    if 0.0 in p:
        ok = p[0.0] >= t["collapse_p"] and h[0.0] <= t["collapse_entropy"]
        results["collapse"] = ok
        lines.append(f"{'MET' if ok else 'MISSED'}: alpha = 0 collapses (P(even) >= {t['collapse_p']} and entropy <= "
                     f"{t['collapse_entropy']} ln5): P(even) {p[0.0]:.3f}, entropy {h[0.0]:.2f} ln5")
    if len(alphas) > 1:
        ok = all(w2[a] > w2[b] for a, b in zip(alphas, alphas[1:]))
        results["w2_falls"] = ok
        lines.append(f"{'MET' if ok else 'MISSED'}: W2 falls as alpha grows: " + ", ".join(f"{a:g}: {w2[a]:.4f}" for a in alphas))
        ok = all(h[a] <= h[b] for a, b in zip(alphas, alphas[1:]))
        results["entropy_rises"] = ok
        lines.append(f"{'MET' if ok else 'MISSED'}: the even-class entropy rises with alpha: "
                     + ", ".join(f"{a:g}: {h[a]:.2f}" for a in alphas))
    good = [a for a in alphas if p[a] >= t["p"] and h[a] >= t["entropy"] and c[a] >= t["confident"]]
    results["best_alpha"] = good[0] if good else None
    lines.append(f"{'MET' if good else 'MISSED'}: some alpha reaches P(even) >= {t['p']}, entropy >= {t['entropy']} ln5 "
                 f"and relative confident share >= {t['confident']}: "
                 + ("; ".join(f"{a:g}: {p[a]:.3f}, {h[a]:.2f}, {c[a]:.2f}" for a in alphas)))
    slowest = max(max(s["seconds"]) for s in stats.values())
    results["slowest_seconds"] = slowest
    lines.append(f"{'MET' if slowest <= t['seconds'] else 'MISSED'}: every run fine-tunes in <= {t['seconds']} s "
                 f"(slowest {slowest:.0f} s, {jobs} run(s) at a time, 1 thread each)")
    return lines, results


def write_grid(images: Any, path: str) -> str:
    """64 samples [64, 1, 8, 8] in [0, 1] -> an 8 x 8 grey grid, each digit enlarged 3x (nearest neighbour)."""
    from orw_diffusers.images import image_grid, save_image

    grid = image_grid(images.repeat(1, 3, 1, 1), ncols=GRID_SIDE, min_tile=24, pad=1).convert("L")
    return save_image(grid, path)


def write_grids(results: list[dict], base_images: Any, img_dir: str, work: str) -> dict[str, str]:
    """One grid per group (its first seed) and one of the base; returns group -> file name."""
    files = {"base (no fine-tuning)": "pixel_digits_base.png"}
    write_grid(base_images, os.path.join(img_dir, files["base (no fine-tuning)"]))
    return write_group_grids(results, work, img_dir, "pixel_digits_", write_grid, files)


def section_markdown(rows: list[list[str]], seed_rows: list[list[str]], targets: list[str], grids: dict[str, str],
                     img_rel: str, command: str, settings: str, discussion: str) -> str:  # fmt: skip
    lines = [
        BEGIN, "",
        "## The paper's experiment on the pixel base: only even digits, full fine-tuning", "",
        "The paper's first experiment as the authors ran it: a pretrained unconditional flow model on the raw "
        "pixels (the 8x8 digits base of `orw_diffusers/digits/pixel.py`, no VAE, no text encoder), every weight "
        "fine-tuned (`policy: full`) through the authors' API `orw_diffusers.cfm.ORWCFMTrainer`, reward = P(even) "
        "under the base's CNN. Judged on 1000 samples per run by the SVC of `digits.evaluate_images`, which the "
        "fine-tuning never sees. The control trains with uniform weights (`weight_normalization: uniform`, alpha 0).", "",
        f"Reproduce: `{command}`", "", f"Settings: {settings}", "",
        "Columns as in the sections above (entropy within the even classes in units of ln 5; rel. conf. = the "
        "judge's >= 90% share relative to real held-out digits; W2 = mean `w2_loss` over the last "
        f"{W2_LAST_ROUNDS} rounds, measured at alpha 0 too through `log_w2_distance: true`; CNN reward = the "
        "reward's mean on the evaluation samples; time = wall seconds of `train()`, one thread per run). "
        "Values are the mean ± half the range over the seeds.", "",
    ]  # fmt: skip
    lines += markdown_table(rows) + ["", "Per seed:", ""] + markdown_table(seed_rows)
    lines += ["", "Targets (checked by the script):", ""] + [f"- {t}" for t in targets]
    lines += ["", "Samples (the first seed of each run; the same evaluation noise for all):", "",
              "| " + " | ".join(grids) + " |", "|" + "|".join("---" for _ in grids) + "|",
              "| " + " | ".join(f"![{g}]({img_rel}/{f})" for g, f in grids.items()) + " |", ""]  # fmt: skip
    lines += ["### Discussion (pixel base)", "", discussion.strip(), "", END]
    return "\n".join(lines) + "\n"


DISCUSSION_MARK = "### Discussion (pixel base)"
def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


def add_run_arguments(parser: argparse.ArgumentParser, defaults: Hyper, base_help: str) -> None:
    """The options both pixel sweeps take: one ``--name`` per ``Hyper`` field (booleans as true / false),
    the evaluation, the processes, and where the base, the runs and the report are."""
    for name, value in asdict(defaults).items():
        kind = true_or_false if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value, help=f"every run's {name} (default {value})")
    parser.add_argument("--num_eval", type=int, default=1000)
    parser.add_argument("--eval_seed", type=int, default=1234)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1: in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work_dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--base", default=None, help=base_help)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "results.md"))
    parser.add_argument("--img_dir", default=None, help="default: images/ next to --output")
    parser.add_argument("--json", default=None, help="also write the table and headline results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one job file


def main(argv: Optional[list[str]] = None) -> int:
    defaults = Hyper()
    parser = argparse.ArgumentParser(prog="python -m bench.digits_pixel_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="mini base in a temp dir, 2 rounds, 16 eval samples")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no_control", action="store_true", help="skip the reward-free control")
    parser.add_argument("--w2_target", type=float, nargs="+", default=[],
                        help="also one run per seed for each W2 budget (alpha set by the controller)")
    parser.add_argument("--w2_start", type=float, default=0.1, help="the starting alpha of the --w2_target runs")
    add_run_arguments(parser, defaults, "the pixel base (default: the cached one, built if missing)")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the section and grids from --work_dir's sweep_results.json, training nothing")
    args = parser.parse_args(argv)
    if args.reward not in REWARDS:
        parser.error(f"--reward {args.reward!r} is not one of {', '.join(REWARDS)}")
    if args.report_only and not args.work_dir:
        parser.error("--report_only needs --work_dir (the folder holding sweep_results.json)")
    if args.one:
        return run_job_file(args.one, run_one)
    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import (PIXEL_BASE_NAME, PixelBuildSettings, build_pixel_base, ensure_pixel_base,
                                            load_pixel_model, sample_pixel_digits, to_judge_images)  # fmt: skip

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-pixel-sweep-")
    hyper = Hyper(**{name: getattr(args, name) for name in asdict(defaults)})
    base = args.base
    if args.quick:  # one alpha, one seed and the control: 2 runs of 2 rounds of 8 samples, in this process
        if base is None:
            base = os.path.join(work, PIXEL_BASE_NAME)
            if not os.path.isdir(base):
                build_pixel_base(base, settings=PixelBuildSettings.mini(), progress=False)
        hyper = Hyper(rounds=2, batch_size=8, num_sampling_steps=2, eval_reward=hyper.eval_reward, hacking_window=2,
                      reward=hyper.reward)  # fmt: skip
        args.num_eval, args.jobs, args.alphas, args.seeds = 16, 1, args.alphas[:1], args.seeds[:1]
        args.w2_target = args.w2_target[:1]
        if argv is None or "--output" not in argv:
            args.output = os.path.join(work, "results.md")
    base = base or ensure_pixel_base()
    start = time.perf_counter()
    command = "python -m bench.digits_pixel_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        with open(os.path.join(work, "sweep_results.json")) as f:
            saved = json.load(f)
        results, hyper = saved["results"], Hyper(**saved["hyper"])
        command = saved.get("command", "python -m bench.digits_pixel_sweep")
        args.num_eval, args.eval_seed, args.jobs = saved.get("num_eval", 1000), saved.get("eval_seed", 1234), saved.get("jobs", 2)
        runs = results
    else:
        runs = plan_runs(args.alphas, args.seeds, not args.no_control, args.w2_target, args.w2_start)
        print(f"{len(runs)} runs, {args.jobs} at a time, in {work}", flush=True)
        results = run_all(runs, args, hyper, base, work)
    base_images = sample_pixel_digits(load_pixel_model(base), args.num_eval, seed=args.eval_seed,
                                      num_steps=hyper.num_sampling_steps)  # fmt: skip
    base_report = evaluate_images(to_judge_images(base_images))
    if not args.report_only:
        with open(os.path.join(work, "sweep_results.json"), "w") as f:
            json.dump({"results": results, "base": base_report, "hyper": asdict(hyper), "command": command.strip(),
                       "num_eval": args.num_eval, "eval_seed": args.eval_seed, "jobs": args.jobs}, f)  # fmt: skip

    policy = "full fine-tuning" if hyper.policy == "full" else f"LoRA rank {hyper.rank}"
    settings = (f"{policy}, {hyper.rounds} rounds of {hyper.batch_size} samples (one Adam step each, lr {hyper.learning_rate:g}, "
                f"no warmup, grad clip {hyper.grad_clip:g}), temperature {hyper.temperature:g}, weight_normalization "
                f"{hyper.weight_normalization}, the sampler refreshed every {hyper.refresh} round(s) "
                f"(steps_per_epoch), {hyper.num_sampling_steps} Euler steps for rollouts and evaluation, clip_samples "
                f"{str(hyper.clip_samples).lower()}, reward {hyper.reward}; evaluation: {args.num_eval} samples, seed {args.eval_seed}; {args.jobs} run(s) at a time")  # fmt: skip

    if hyper.eval_reward or any(r["spec"].get("w2_target") is not None for r in results):
        from bench.guard_report import check_guard_targets, guard_section_markdown, guard_table

        rows = guard_table(results, hyper.rounds, work)
        targets, headline = check_guard_targets(results, W2_TARGET_FACTOR, hyper.rounds)
        grids: dict[str, str] = {}
        guards = (f"eval_reward {hyper.eval_reward or 'none'}, hacking_window {hyper.hacking_window}, hacking_min_rise "
                  f"{hyper.hacking_min_rise:g}, hacking_min_drop {hyper.hacking_min_drop:g}; w2_adapt_rate "
                  f"{hyper.w2_adapt_rate:g}, the budget runs start at alpha {args.w2_start:g}")  # fmt: skip
        mark = "### Discussion (staying close)"

        def section_of(discussion: str) -> str:
            return guard_section_markdown(GUARD_BEGIN, GUARD_END, rows, targets, command.strip(), settings, guards,
                                          discussion, mark)  # fmt: skip

        update_results(args.output, section_of, GUARD_BEGIN, GUARD_END, mark)
    else:
        stats = group_stats(results)
        rows = table(stats, base_report)
        targets, headline = check_targets(stats, args.jobs)
        img_dir = args.img_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "images")
        grids = write_grids(results, base_images[: GRID_SIDE**2], img_dir, work)
        img_rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(args.output)))

        def section_of(discussion: str) -> str:
            return section_markdown(rows, per_seed_table(results), targets, grids, img_rel, command.strip(), settings,
                                    discussion)  # fmt: skip

        update_results(args.output, section_of, BEGIN, END, DISCUSSION_MARK)
    for line in targets:
        print(line)
    print(f"{len(results)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s; wrote {args.output} and "
          f"{len(grids)} grids; raw results: {work}/sweep_results.json")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": "Only even digits on the pixel base", "command": "python -m bench.digits_pixel_sweep",
                       "table": rows, "notes": targets, "results": headline}, f, indent=1)  # fmt: skip
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
