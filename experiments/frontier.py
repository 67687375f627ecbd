"""The reward-distance frontier of ORW-CFM-W2, Flow-GRPO and DiffusionNFT: each objective swept over its distance
knob, on the SD3 digits base (LoRA) and the pixel base (full fine-tuning), two targets, 3 seeds.

    python -m experiments.frontier --work_dir /tmp/frontier            # the whole table (resumable: rerun to continue)
    python -m experiments.frontier --quick                             # plumbing only: mini bases, 2 rounds, 1 seed
    python -m experiments.frontier --bases sd3 --targets even --seeds 0 --knob_index 1 2 --work_dir /tmp/fr-slice
    python -m experiments.frontier --bases sd3 --targets even odd --seeds 0 --knob_index 1 --objectives flow_grpo \
        --set kl_type=exact --work_dir /tmp/cmp_exact      # a training setting changed for every run

The runs are the studies' runners: ``experiments.digits_alpha_sweep`` (the training script on each objective's digits
config) and ``experiments.digits_pixel_sweep`` (``ORWCFMTrainer`` with ``objective`` set), so every objective spends the
same reward queries on a base; each is judged by the SVC the training never sees. A run whose folder holds its
result is not run again. The columns are described in docs/results.md ("The reward-distance frontier"); W2 is the
estimator each objective logs (``experiments.sweep.DISTANCE_KEYS``), passes / round counts the transformer's (or pixel
MLP's) forward calls per round while training (CFG's two branches are one call; backward passes are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
from typing import Any, Optional

from bench import REPO, markdown_table
from experiments import digits_alpha_sweep as sd3
from experiments import digits_pixel_sweep as pixel
from experiments.sweep import (finished_result, mean_spread, mini_digits_base, parse_overrides, run_child_jobs, run_job_file,
                         study_parser, target_stats, write_section)  # fmt: skip

#: each objective's distance knob and its values. DiffusionNFT: kl_beta, its only term tied to the base; the
#: paper's beta (our nft_beta) and the soft-update rate (sampler_decay_*) are trust regions around the old
#: policy, the last round's sampler: they set how far one round moves (its optimum is v_old + (2 / beta) Delta),
#: not how far the run may drift from the base
KNOBS = {"orw_cfm_w2": ("w2_coefficient", (0.03, 0.1, 0.3)), "flow_grpo": ("kl_beta", (0.004, 0.04, 0.4)),
         "diffusion_nft": ("kl_beta", (1e-4, 1e-2, 1.0))}  # fmt: skip
TARGETS = ("even", "three")  # the default of sd3.TARGET_DIGITS: even digits, and {1, 4, 7}
BASES = ("sd3", "pixel")
#: seconds per round measured by this study on 2 cores, 2 runs at a time and nothing else running (the means of
#: the "s / round" column of docs/results.md's frontier over its runs, even digits)
SECONDS_PER_ROUND = {("sd3", "orw_cfm_w2"): 1.27, ("sd3", "flow_grpo"): 1.86, ("sd3", "diffusion_nft"): 3.46,
                     ("pixel", "orw_cfm_w2"): 0.075, ("pixel", "flow_grpo"): 0.116, ("pixel", "diffusion_nft"): 0.123}
#: the pixel base's Flow-GRPO rollouts, as configs/digits_even_grpo.yaml: 4 stochastic trained steps; DiffusionNFT
#: trains as many of the grid's 20 timesteps per sample (int(20 * 0.2) = 4), so both spend 4 trained passes a sample
PIXEL_KEYS = {"flow_grpo": {"noise_level": 0.7, "sde_window_size": 4}, "diffusion_nft": {"nft_timestep_fraction": 0.2}}
MODEL_CLASSES = ("SD3Transformer2DModel", "PixelVelocityMLP")  # the transformer passes counted per round
BEGIN, END = "<!-- frontier: begin (written by python -m experiments.frontier --docs) -->", "<!-- frontier: end -->"


def plan(args: argparse.Namespace, bases: dict[str, str], work: str, extra: dict, hyper: Any) -> list[dict]:
    """One job file per base x target x objective x knob value x seed (``args.knob_index``: those values only)."""
    jobs = []
    for kind, target, objective in itertools.product(args.bases, args.targets, args.objectives):
        knob, values = KNOBS[objective]
        for value, seed in itertools.product(values if args.knob_index is None else [values[i] for i in args.knob_index],
                                             args.seeds):  # fmt: skip
            name, group = f"{kind}-{target}-{objective}-{knob}{value:g}-s{seed}", f"{knob} = {value:g}"
            orw, keys = objective == "orw_cfm_w2", {} if objective == "orw_cfm_w2" else {knob: value}
            if kind == "sd3":
                spec = sd3.RunSpec(name, group, value if orw else 0.0, seed, target=target, overrides=keys,
                                   objective=objective)  # fmt: skip
                job = sd3.job_for(spec, args, bases[kind], work, extra)
            else:
                spec = pixel.RunSpec(name, group, value if orw else 0.0, seed, objective=objective,
                                     classes=tuple(sd3.TARGET_DIGITS[target]),
                                     overrides={**PIXEL_KEYS.get(objective, {}), **keys, **args.overrides})  # fmt: skip
                job = pixel.job_for(spec, argparse.Namespace(**{**vars(args), "num_eval": args.pixel_eval}), hyper,
                                    bases[kind], work)  # fmt: skip
            jobs.append({**job, "frontier": {"base": kind, "target": target, "objective": objective, "knob": knob,
                                             "value": value}})  # fmt: skip
    return jobs


def run_one(job: dict[str, Any]) -> None:
    """The child: the base's runner, counting the transformer's forward calls while it trains; then the
    training reward per round, the passes and the seconds per round join its ``sweep_result.json``."""
    import torch

    import orw_diffusers.train
    from orw_diffusers.hub import read_metrics

    calls = {"now": 0, "trained": 0}

    def count(module: torch.nn.Module, inputs: Any) -> None:
        if type(module).__name__ in MODEL_CLASSES:
            calls["now"] += 1

    def counted(train: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            out = train(*a, **k)
            calls["trained"] = calls["now"]  # the evaluation's samples come after: not counted
            return out

        return wrapper

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    if job["frontier"]["base"] == "sd3":
        orw_diffusers.train.main = counted(orw_diffusers.train.main)
        sd3.run_one(job)
    else:
        pixel.fine_tune = counted(pixel.fine_tune)
        pixel.run_one(job)
    path, rows = os.path.join(job["out_dir"], "sweep_result.json"), read_metrics(job["out_dir"])
    with open(path) as f:
        result = json.load(f)
    result.update(frontier=job["frontier"], reward_curve=[r["reward_mean"] for r in rows],
                  per_round=rows[-1]["samples_seen"] // len(rows), passes_per_round=calls["trained"] / len(rows),
                  seconds_per_round=statistics.fmean(r["seconds"] for r in rows))  # fmt: skip
    with open(path, "w") as f:
        json.dump(result, f)


def first_reaching(curve: list[float], level: float, per_round: int) -> Optional[int]:
    """Reward queries until a round's mean reward first reaches ``level`` (None: never)."""
    return next(((i + 1) * per_round for i, r in enumerate(curve) if r >= level), None)


def stats(result: dict) -> tuple[float, float]:
    """(P(target), entropy within the target classes in units of ln(number of classes)), by the SVC."""
    return target_stats(result["report"], sd3.TARGET_DIGITS[result["frontier"]["target"]])


def summary(result: dict) -> str:
    p, h = stats(result)
    return f"P(target) {p:.3f}, entropy {h:.2f}, W2 {result['w2_final']:.4f}"


def groups_of(jobs: list[dict], results: list[dict]) -> dict[tuple, list[dict]]:
    """(base, target, objective, knob value) -> its finished runs ([] when none finished), in plan order."""
    done = {r["spec"]["name"]: r for r in results}
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        f = job["frontier"]
        group = groups.setdefault((f["base"], f["target"], f["objective"], f["value"]), [])
        if job["spec"]["name"] in done:
            group.append(done[job["spec"]["name"]])
    return groups


def table(groups: dict[tuple, list[dict]], level: float) -> list[list[str]]:
    rows = [["base", "target", "objective", "knob", "seeds", "P(target)", "entropy (ln k)", "rel. conf.", "W2",
             f"queries to reward {level:g}", "time (s)", "s / round", "passes / round"]]  # fmt: skip
    for (kind, target, objective, value), rs in groups.items():
        head = [kind, target, objective, f"{KNOBS[objective][0]} {value:g}", str(len(rs))]
        if not rs:
            rows.append(head + ["not finished (failed: see its run.log)"] + [""] * 7)
            continue
        points = [stats(r) for r in rs]
        reached = [first_reaching(r["reward_curve"], level, r["per_round"]) for r in rs]
        rows.append(head + [
            mean_spread([p[0] for p in points], 3), mean_spread([p[1] for p in points], 2),
            mean_spread([r["report"]["relative_confident_share"] for r in rs], 2), mean_spread([r["w2_final"] for r in rs], 4),
            ", ".join("never" if q is None else str(q) for q in reached), mean_spread([r["train_seconds"] for r in rs], 0),
            mean_spread([r["seconds_per_round"] for r in rs], 2), f"{statistics.fmean(r['passes_per_round'] for r in rs):.0f}",
        ])  # fmt: skip
    return rows


def per_seed_table(groups: dict[tuple, list[dict]]) -> list[list[str]]:
    """Each point with more than one seed, a column per seed: "P(target) / entropy / rel. conf." (a target that
    must hold on every seed is read off here, not off the means)."""
    multi = {k: rs for k, rs in groups.items() if len(rs) > 1}
    seeds = sorted({r["spec"]["seed"] for rs in multi.values() for r in rs})
    rows = [["base", "target", "objective", "knob", *[f"seed {s}" for s in seeds]]] if multi else []
    for (kind, target, objective, value), rs in multi.items():
        cells = {r["spec"]["seed"]: "{:.3f} / {:.2f} / {:.2f}".format(*stats(r), r["report"]["relative_confident_share"])
                 for r in rs}  # fmt: skip
        rows.append([kind, target, objective, f"{KNOBS[objective][0]} {value:g}", *[cells.get(s, "") for s in seeds]])
    return rows


def mean_and_range(seeds_per_point: list) -> tuple[list[float], list[list[float]]]:
    """Each point's mean over its seeds, and matplotlib's error bars from the lowest seed to the highest."""
    means = [statistics.fmean(values) for values in seeds_per_point]
    return means, [[m - min(v) for m, v in zip(means, seeds_per_point)], [max(v) - m for m, v in zip(means, seeds_per_point)]]


def plot(groups: dict[tuple, list[dict]], img_dir: str) -> list[str]:
    """One PNG per base and target: P(target) and entropy against W2, a curve per objective (mean over seeds,
    error bars: the seeds' range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(img_dir, exist_ok=True)
    files = []
    for kind, target in dict.fromkeys((k[0], k[1]) for k in groups):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for objective in KNOBS:
            points = sorted(([r["w2_final"] for r in rs], *zip(*map(stats, rs)))
                            for k, rs in groups.items() if k[:3] == (kind, target, objective) and rs)  # fmt: skip
            if not points:
                continue
            for ax, i, label in ((axes[0], 1, "P(target)"), (axes[1], 2, "entropy within the target (ln k)")):
                (x, xerr), (y, yerr) = mean_and_range([p[0] for p in points]), mean_and_range([p[i] for p in points])
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=objective)
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
                ax.set_xlabel("W2 (mean ||v - v_ref||^2, last 20 rounds)")
                ax.set_ylabel(label)
        axes[0].legend()
        fig.suptitle(f"{kind} base, target {target}")
        fig.tight_layout()
        files.append(os.path.join(img_dir, f"frontier_{kind}_{target}.png"))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser("frontier", __doc__, "mini bases, 2 rounds, 1 seed, 1 knob value", [0, 1, 2], 500,
                          "kl_type=exact")  # fmt: skip
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parser.add_argument("--targets", nargs="+", choices=tuple(sd3.TARGET_DIGITS), default=list(TARGETS))
    parser.add_argument("--objectives", nargs="+", choices=tuple(KNOBS), default=list(KNOBS))
    parser.add_argument("--knob_index", type=int, nargs="+", choices=(0, 1, 2), default=None,
                        help="only these values of each knob (0: the lowest)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: SD3 150, pixel 1000)")
    parser.add_argument("--level", type=float, default=0.9, help="training reward level of the queries column")
    parser.add_argument("--pixel_eval", type=int, default=1000, help="evaluation samples per pixel run")
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--report_only", action="store_true", help="the table and plots of the finished runs only")
    parser.add_argument("--docs", action="store_true", help="PNGs into docs/img and a section of docs/results.md")
    args = parser.parse_args(argv)
    if args.one:
        return run_job_file(args.one, run_one)
    args.overrides = parse_overrides(parser, args.set, (*sd3.PER_RUN_KEYS, *{knob for knob, _ in KNOBS.values()}),
                                     args.objectives)

    from orw_diffusers import digits
    from orw_diffusers.digits.pixel import PIXEL_BASE_NAME, PixelBuildSettings, build_pixel_base, ensure_pixel_base

    work = args.work_dir or tempfile.mkdtemp(prefix="frontier-")
    extra: dict[str, Any] = {}
    hyper = pixel.Hyper()
    if args.quick:
        bases = {"sd3": mini_digits_base(work), "pixel": os.path.join(work, "cache", PIXEL_BASE_NAME)}
        if not os.path.isdir(bases["pixel"]):
            build_pixel_base(bases["pixel"], settings=PixelBuildSettings.mini(), progress=False)
        # 6 steps: room for Flow-GRPO's window of 4 stochastic steps
        extra = {"num_epochs": 2, "images_per_prompt": 4, "sample_batch_size": 4, "train_batch_size": 4,
                 "num_sampling_steps": 6}  # fmt: skip
        hyper = pixel.Hyper(rounds=2, batch_size=8, num_sampling_steps=6)
        args.num_eval, args.pixel_eval, args.eval_steps, args.seeds = 16, 16, 2, args.seeds[:1]
        args.knob_index = args.knob_index or [1]
    if args.rounds:  # a shorter (or longer) budget, the same for every objective
        extra["num_epochs"], hyper = args.rounds, dataclasses.replace(hyper, rounds=args.rounds)
    extra.update(args.overrides)
    if not args.quick:
        bases = {kind: (digits.ensure_digits_base() if kind == "sd3" else ensure_pixel_base()) for kind in args.bases}
    jobs = plan(args, bases, work, extra, hyper)
    rounds = {"sd3": extra.get("num_epochs", 150), "pixel": hyper.rounds}
    todo = [j for j in jobs if not os.path.isfile(os.path.join(j["out_dir"], "sweep_result.json"))]
    seconds = sum(rounds[j["frontier"]["base"]] * SECONDS_PER_ROUND[j["frontier"]["base"], j["frontier"]["objective"]]
                  for j in todo) / args.jobs  # fmt: skip
    if not args.report_only:
        print(f"{len(jobs)} runs ({len(jobs) - len(todo)} finished before), {args.jobs} at a time, in {work}; "
              f"expected {seconds / 3600:.1f} h of training (from seconds per round per objective and base)", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.report_only:
        results = [r for r in map(finished_result, jobs) if r is not None]
    else:
        results = run_child_jobs(jobs, "experiments.frontier", args.jobs, env, summary, resume=True)
    groups = groups_of(jobs, results)
    if args.report_only:  # a report of what ran: the planned points without a finished run are left out
        unrun = [k for k, rs in groups.items() if not rs]
        groups = {k: rs for k, rs in groups.items() if rs}
        if unrun:
            print(f"{len(unrun)} planned points have no finished run in {work}; left out of the report", flush=True)
    rows, seed_rows = table(groups, args.level), per_seed_table(groups)
    command = "python -m experiments.frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    img_dir = os.path.join(REPO, "docs", "img") if args.docs else work
    pngs = plot(groups, img_dir)
    report = [*markdown_table(rows), ""]
    if seed_rows:
        report += ["Per seed (P(target) / entropy (ln k) / rel. conf.):", "", *markdown_table(seed_rows), ""]
    print(command.strip())
    print("\n".join(report))
    print(f"{len(results)}/{len(jobs)} runs; plots: {', '.join(pngs)}")
    if args.docs:
        body = [f"Reproduce: `{command.strip()}`", "", *report, *[f"![{os.path.basename(p)}](img/{os.path.basename(p)})" for p in pngs]]
        write_section(os.path.join(REPO, "docs", "results.md"), BEGIN, END, "## The reward-distance frontier", body, "### Discussion (frontier)")
    return 0 if len(results) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
