"""The paper's first experiment on the pixel digits base: full fine-tuning towards even digits, over alpha.

    python -m experiments.digits_pixel_sweep            # 5 alphas + the reward-free control, 2 seeds, 2 runs at a time
    python -m experiments.digits_pixel_sweep --quick    # plumbing only: the mini base, 2 rounds per run, into a temp dir
    python -m experiments.digits_pixel_sweep --alphas 0 0.1 --no_control --w2_target 0.05 0.15 0.5 \
        --eval_reward digit_judge_even            # a W2 budget per target, and the held-out judge's alarm
    python -m experiments.digits_pixel_sweep --cfg      # the class-conditional base at guidance 1 and 2

Each run is ``ORWCFMTrainer`` (the authors' API on our loop) on a fresh copy of the pixel base, reward P(even)
under the base's CNN, ``log_w2_distance: true``; then 1000 samples of the fine-tuned weights judged by the SVC of
``digits.evaluate_images``, which the fine-tuning never sees. The control trains with uniform weights. ``--cfg``:
the class-conditional base prompted with the generic label, the loss on the guided or the conditional velocity,
and the *sampled-field gap* (tuned vs base guided velocity on the run's samples). Each mode writes its section of
docs/results.md (the sweep; "Staying close" with ``--w2_target``/``--eval_reward``; the class-conditional base)
and grids of 64 samples per run group into docs/images/.
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
from typing import Any, Optional, Sequence

import yaml

from bench import REPO, markdown_table
from experiments.sweep import (alpha_checks, alpha_means, by_group, check, field_distance, finish_run, histogram_text,
                         mean_spread, run_child_jobs, run_job_file, study_parser, target_stats, write_group_grids,
                         write_section)  # fmt: skip

EVEN = (0, 2, 4, 6, 8)
REWARDS = ("cnn", "robust_cnn")  # the training reward: P(even) under the base's CNN or the robust one
GRID_SIDE = 8  # grids of 8 x 8 samples
TARGETS = {"collapse_p": 0.97, "collapse_entropy": 0.5, "p": 0.95, "entropy": 0.85, "confident": 0.85, "seconds": 120}
W2_TARGET_FACTOR = 1.5  # a W2 budget is met when the final W2 is within this factor of its target
GUIDANCE = 2.0  # --cfg: the guided arms' guidance
#: each mode's section of docs/results.md: markers, heading, and the heading of its hand-written discussion
SECTIONS = {
    "sweep": ("<!-- digits_pixel_sweep: begin (written by python -m experiments.digits_pixel_sweep) -->",
              "<!-- digits_pixel_sweep: end -->",
              "## The paper's experiment on the pixel base: only even digits, full fine-tuning",
              "### Discussion (pixel base)"),
    "guard": ("<!-- digits_pixel_sweep guard: begin (written by python -m experiments.digits_pixel_sweep --w2_target/--eval_reward) -->",
              "<!-- digits_pixel_sweep guard: end -->",
              "## Staying close on the pixel base: a W2 budget and a held-out judge", "### Discussion (staying close)"),
    "cfg": ("<!-- digits_pixel_sweep cfg: begin (written by python -m experiments.digits_pixel_sweep --cfg) -->",
            "<!-- digits_pixel_sweep cfg: end -->", "## The class-conditional pixel base under classifier-free guidance",
            "### Discussion (class-conditional pixel base)"),
}  # fmt: skip


@dataclass(frozen=True)
class Hyper:
    """Every run's fine-tuning settings (the study's defaults are the tuned ones, docs/results.md)."""

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
    overrides: dict[str, Any] = field(default_factory=dict)  # more trainer config keys (null_class: --cfg's runs)


def plan_runs(alphas: list[float], seeds: list[int], control: bool = True, w2_targets: Sequence[float] = (),
              start_alpha: float = 0.1) -> list[RunSpec]:  # fmt: skip
    runs = [RunSpec(f"alpha{a:g}-s{s}", f"alpha = {a:g}", a, s) for a in alphas for s in seeds]
    runs += [RunSpec(f"target{t:g}-s{s}", f"w2_target = {t:g}", start_alpha, s, w2_target=t)
             for t in w2_targets for s in seeds]  # fmt: skip
    if control:
        runs += [RunSpec(f"control-s{s}", "control: uniform weights, alpha = 0", 0.0, s, uniform=True) for s in seeds]
    return runs


def plan_cfg_runs(alphas: list[float], seeds: list[int], guidance: float = GUIDANCE) -> list[RunSpec]:
    """Per alpha: guidance 1, and ``guidance`` with the guided and with the conditional loss."""
    from orw_diffusers.digits.pixel import GENERIC_LABEL, NULL_LABEL

    runs = []
    for a in alphas:
        arms = [(1.0, "guided", f"g1-alpha{a:g}", f"guidance 1, alpha = {a:g}")]
        arms += [(guidance, mode, f"g{guidance:g}-{mode}-alpha{a:g}", f"guidance {guidance:g}, {mode} loss, alpha = {a:g}")
                 for mode in ("guided", "conditional")]  # fmt: skip
        for g, mode, tag, group in arms:
            keys = {"prompts": [str(GENERIC_LABEL)], "null_class": NULL_LABEL, "guidance_scale": g, "cfg_training": mode}
            runs += [RunSpec(f"{tag}-s{s}", group, a, s, overrides=keys) for s in seeds]
    return runs


def trainer_config(spec: RunSpec, hyper: Hyper, out_dir: str) -> dict[str, Any]:
    """The ``ORWCFMTrainer`` config of one run: the original's keys, plus a few of ours."""
    config = {
        "learning_rate": hyper.learning_rate, "warmup_steps": 0, "w2_coefficient": spec.alpha,
        "temperature": hyper.temperature, "grad_clip": hyper.grad_clip, "batch_size": hyper.batch_size,
        "savedir": out_dir, "weight_normalization": "uniform" if spec.uniform else hyper.weight_normalization,
        "log_w2_distance": True, "num_sampling_steps": hyper.num_sampling_steps, "clip_samples": hyper.clip_samples,
        "policy": hyper.policy, "rank": hyper.rank, "sample_log_interval": 0, "seed": spec.seed,
        "eval_reward": yaml.safe_load(hyper.eval_reward) if hyper.eval_reward else None,
        "hacking_window": hyper.hacking_window, "hacking_min_rise": hyper.hacking_min_rise,
        "hacking_min_drop": hyper.hacking_min_drop, "w2_target": spec.w2_target, "w2_adapt_rate": hyper.w2_adapt_rate,
    }  # fmt: skip
    if spec.objective != "orw_cfm_w2":
        from orw_diffusers.objectives import objective_class

        config = {k: v for k, v in config.items() if k not in objective_class("orw_cfm_w2").config_keys}
        config["objective"] = spec.objective
    return {**config, **spec.overrides}


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


def sampled_field_gap(tuned: Any, base: Any, images: Any, guidance: float, seed: int = 0) -> float:
    """Mean squared difference of the tuned and base guided velocities for the generic label on ``images``'
    flow-matching path (``x_t = t x1 + (1 - t) x0``, t uniform; torchcfm's convention)."""
    import torch

    from orw_diffusers.digits.pixel import GENERIC_LABEL, NULL_LABEL

    def guided(model: Any, t: Any, x: Any) -> Any:
        v, v_null = (model(t, x, torch.full((len(x),), label, dtype=torch.long)) for label in (GENERIC_LABEL, NULL_LABEL))
        return v if guidance == 1 else v_null + guidance * (v - v_null)

    g = torch.Generator().manual_seed(seed)
    x1 = images * 2 - 1  # [0, 1] -> the model's data range (-1, 1)
    x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(x1), generator=g)
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    with torch.no_grad():
        return (guided(tuned, t, x_t) - guided(base, t, x_t)).pow(2).mean().item()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import (GENERIC_LABEL, load_pixel_model, pixel_digit_reward, sample_pixel_digits,
                                            to_judge_images)  # fmt: skip
    from orw_diffusers.hub import read_metrics

    torch.set_num_threads(job["threads"])
    spec, hyper, base, out_dir = RunSpec(**job["spec"]), Hyper(**job["hyper"]), job["base"], job["out_dir"]
    reward_fn = pixel_digit_reward(base, tuple(spec.classes), robust=hyper.reward == "robust_cnn")
    tuned, train_seconds = fine_tune(trainer_config(spec, hyper, out_dir), base, reward_fn, hyper)
    guidance = spec.overrides.get("guidance_scale", 1.0) if "null_class" in spec.overrides else None
    label = {} if guidance is None else {"label": GENERIC_LABEL, "guidance_scale": guidance}
    images = sample_pixel_digits(tuned, job["num_eval"], seed=job["eval_seed"], num_steps=hyper.num_sampling_steps,
                                 **label)  # fmt: skip
    rows = read_metrics(out_dir)
    # reward: the CNN's P(classes) on the evaluation samples; eval_final: the held-out judges' means over the last
    # rounds; alarm_round: the first round the reward-hacking alarm held (None: never)
    result = {
        "spec": asdict(spec), "report": evaluate_images(to_judge_images(images)), "reward": reward_fn(images).mean().item(),
        "w2_final": field_distance(rows), "alpha_final": rows[-1].get("w2_coefficient"),
        "eval_final": {k[len("eval/") : -len("_mean")]: statistics.fmean(r[k] for r in rows[-20:])
                       for k in rows[-1] if k.startswith("eval/")},
        "alarm_round": next((r["epoch"] for r in rows if r.get("hacking_alarm")), None), "rounds": len(rows),
        "samples_seen": rows[-1]["samples_seen"], "train_seconds": train_seconds,
    }  # fmt: skip
    if guidance is not None:
        result["field_gap"] = sampled_field_gap(tuned, load_pixel_model(base), images, guidance)
    return finish_run(out_dir, result, images[: GRID_SIDE**2])


def job_for(spec: Any, args: argparse.Namespace, hyper: Hyper, base: str, work: str) -> dict[str, Any]:
    """The job file of one run (``spec``: a dataclass with a ``name``)."""
    out_dir = os.path.join(work, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    return {"spec": asdict(spec), "hyper": asdict(hyper), "base": base, "out_dir": out_dir, "threads": args.threads,
            "num_eval": args.num_eval, "eval_seed": args.eval_seed}  # fmt: skip


def run_all(runs: list[RunSpec], args: argparse.Namespace, hyper: Hyper, base: str, work: str) -> list[dict]:
    """``--jobs 1``: each run in this process, one after another; more: ``python -m experiments.digits_pixel_sweep --one
    job`` in that many child processes at a time. Results in the order of ``runs``."""
    jobs = [job_for(spec, args, hyper, base, work) for spec in runs]
    if args.jobs == 1:
        results = []
        for job in jobs:
            results.append(run_one(job))
            print(f"{job['spec']['name']}: {summary_line(results[-1])}", flush=True)
        return results
    results = run_child_jobs(jobs, "experiments.digits_pixel_sweep", args.jobs, {"OMP_NUM_THREADS": str(args.threads)},
                             summary_line)  # fmt: skip
    order = [spec.name for spec in runs]
    return sorted(results, key=lambda r: order.index(r["spec"]["name"]))


def even(report: dict) -> tuple[float, float]:
    """(P(even), the even-class entropy in units of ln 5)."""
    return target_stats(report, EVEN)


def summary_line(result: dict) -> str:
    (p, h), gap = even(result["report"]), result.get("field_gap")
    return (f"P(even) {p:.3f}, entropy {h:.2f} ln5, rel. confident {result['report']['relative_confident_share']:.2f}, "
            f"W2 {result['w2_final']:.4f}{'' if gap is None else f', field gap {gap:.4f}'}, "
            f"{result['train_seconds']:.0f} s")  # fmt: skip


def table(groups: dict[str, list[dict]], base_reports: dict[str, dict], gap: bool = False) -> list[list[str]]:
    """Base rows, then one row per group (mean ± half the range over its seeds); ``gap``: the sampled-field gap."""
    rows = [["run", "seeds", "P(even)", "entropy (ln5)", "rel. conf.", "W2 (trained field)" if gap else "W2",
             *(["sampled-field gap"] if gap else []), "CNN reward", "histogram 0..9 (%)", "time (s)"]]  # fmt: skip
    for name, rep in base_reports.items():
        p, h = even(rep)
        rows.append([name, "-", f"{p:.3f}", f"{h:.2f}", f"{rep['relative_confident_share']:.2f}", "0", *(["0"] if gap else []),
                     "-", histogram_text(rep["histogram"]), "0"])  # fmt: skip
    for group, rs in groups.items():
        def col(key: Any, digits: int) -> str:
            return mean_spread([key(r) for r in rs], digits)

        rows.append([group, str(len(rs)), col(lambda r: even(r["report"])[0], 3), col(lambda r: even(r["report"])[1], 2),
                     col(lambda r: r["report"]["relative_confident_share"], 2), col(lambda r: r["w2_final"], 4),
                     *([col(lambda r: r["field_gap"], 4)] if gap else []), col(lambda r: r["reward"], 3),
                     histogram_text([statistics.fmean(r["report"]["histogram"][d] for r in rs) for d in range(10)]),
                     col(lambda r: r["train_seconds"], 0)])  # fmt: skip
    return rows


def check_targets(results: list[dict], jobs: int) -> tuple[list[str], dict[str, Any]]:
    """The experiment's targets, each 'MET'/'MISSED' with its numbers; and each alpha's mean (P(even), entropy,
    relative confident share, W2)."""
    m = alpha_means([r for r in results if not r["spec"]["uniform"]], lambda r: even(r["report"]))
    t, lines = TARGETS, alpha_checks(m, TARGETS["collapse_p"], TARGETS["collapse_entropy"])
    good = any(p >= t["p"] and h >= t["entropy"] and c >= t["confident"] for p, h, c, _ in m.values())
    lines.append(check(good, f"some alpha reaches P(even) >= {t['p']}, entropy >= {t['entropy']} ln5 and relative "
                       f"confident share >= {t['confident']}: "
                       + "; ".join(f"{a:g}: {p:.3f}, {h:.2f}, {c:.2f}" for a, (p, h, c, _) in m.items())))  # fmt: skip
    slowest = max(r["train_seconds"] for r in results)
    lines.append(check(slowest <= t["seconds"], f"every run fine-tunes in <= {t['seconds']} s (slowest {slowest:.0f} "
                       f"s, {jobs} run(s) at a time, 1 thread each)"))  # fmt: skip
    return lines, {f"{a:g}": v for a, v in m.items()}


def guard_table(results: list[dict], rounds: int, work: str) -> list[list[str]]:
    """One row per run: the judge's numbers, W2 against the target, the final alpha, the alarm's round and the drift
    of the sampled latents' RMS (round 0: the base's samples)."""
    from orw_diffusers.hub import read_metrics

    rows = [["run", "w2_target", "W2", "W2 / target", "final alpha", "P(even)", "entropy (ln5)", "rel. conf.",
             "CNN reward", "judge (last rounds)", "alarm (first round)", "latent RMS (round 0 → last)"]]  # fmt: skip
    for r in results:
        target, alarm, (p, h) = r["spec"]["w2_target"], r["alarm_round"], even(r["report"])
        metrics = read_metrics(os.path.join(work, r["spec"]["name"]))
        rows.append([
            r["spec"]["name"], "-" if target is None else f"{target:g}", f"{r['w2_final']:.4f}",
            "-" if target is None else f"{r['w2_final'] / target:.2f}", f"{r['alpha_final']:.4g}", f"{p:.3f}",
            f"{h:.2f}", f"{r['report']['relative_confident_share']:.2f}", f"{r['reward']:.3f}",
            ", ".join(f"{v:.3f}" for v in r["eval_final"].values()) or "-", "-" if alarm is None else f"{alarm} of {rounds}",
            f"{metrics[0]['latent_rms']:.2f} → {metrics[-1]['latent_rms']:.2f}" if "latent_rms" in metrics[0] else "-",
        ])  # fmt: skip
    return rows


def check_guard(results: list[dict], rounds: int) -> list[str]:
    """Each W2 budget within ``W2_TARGET_FACTOR`` of its target, the targets' final W2s distinct and in order; the
    alarm raised before the final round in the alpha-0 runs and never in the alpha-0.1 runs."""
    lines, budget = [], [r for r in results if r["spec"]["w2_target"] is not None]
    if budget:
        ratios = {r["spec"]["name"]: r["w2_final"] / r["spec"]["w2_target"] for r in budget}
        lines.append(check(all(1 / W2_TARGET_FACTOR <= q <= W2_TARGET_FACTOR for q in ratios.values()),
                           f"every W2 budget ends within a factor {W2_TARGET_FACTOR:g} of its target (final W2 / "
                           "target): " + ", ".join(f"{n}: {q:.2f}" for n, q in ratios.items())))  # fmt: skip
        by_target: dict[float, list[float]] = {}
        for r in budget:
            by_target.setdefault(r["spec"]["w2_target"], []).append(r["w2_final"])
        means = sorted((statistics.fmean(v), t) for t, v in by_target.items())
        distinct = [t for _, t in means] == sorted(by_target) and len({m for m, _ in means}) == len(means)
        lines.append(check(distinct, "the targets give distinct final W2s in their order: "
                           + ", ".join(f"{t:g}: {m:.4f}" for m, t in means)))  # fmt: skip
    for alpha, hacked in ((0.0, True), (0.1, False)):
        alarms = [(r["spec"]["name"], r["alarm_round"]) for r in results if r["eval_final"] and r["spec"]["alpha"] == alpha
                  and r["spec"]["w2_target"] is None and not r["spec"]["uniform"]]  # fmt: skip
        if alarms:
            ok = all(a is not None and a < rounds - 1 if hacked else a is None for _, a in alarms)
            lines.append(check(ok, ("the alarm is raised before the final round at alpha 0: " if hacked else
                                    "no alarm at alpha 0.1: ") + ", ".join(
                f"{n}: {'never' if a is None else f'round {a}'}" for n, a in alarms)))  # fmt: skip
    return lines


def write_grid(images: Any, path: str) -> str:
    """64 samples [64, 1, 8, 8] in [0, 1] -> an 8 x 8 grey grid, each digit enlarged 3x (nearest neighbour)."""
    from orw_diffusers.images import image_grid, save_image

    grid = image_grid(images.repeat(1, 3, 1, 1), ncols=GRID_SIDE, min_tile=24, pad=1).convert("L")
    return save_image(grid, path)


def grid_lines(results: list[dict], base_images: dict[str, Any], img_dir: str, img_rel: str, work: str,
               prefix: str) -> list[str]:  # fmt: skip
    """The grids of the base(s) and of each group's first seed, written to ``img_dir``, as a one-row table."""
    files = {}
    for name, images in base_images.items():
        files[name] = f"{prefix}base{name.partition(',')[2].replace(' guidance ', '_g')}.png"
        write_grid(images[: GRID_SIDE**2], os.path.join(img_dir, files[name]))
    files = write_group_grids(results, work, img_dir, prefix, write_grid, files)
    return ["Samples (the first seed of each run; the same evaluation noise for all):", "",
            *markdown_table([list(files), [f"![{g}]({img_rel}/{f})" for g, f in files.items()]])]  # fmt: skip


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


def main(argv: Optional[list[str]] = None) -> int:
    defaults = Hyper()
    parser = study_parser("digits_pixel_sweep", __doc__, "the mini base, 2 rounds, 16 eval samples; --jobs 1: in this process",
                          [0, 1], 1000)  # fmt: skip
    parser.add_argument("--alphas", type=float, nargs="+", default=None,
                        help="default: 0 0.05 0.1 0.2 0.5 (with --cfg: 0 0.1)")
    parser.add_argument("--no_control", action="store_true", help="skip the reward-free control")
    parser.add_argument("--w2_target", type=float, nargs="+", default=[],
                        help="also one run per seed for each W2 budget (alpha set by the controller)")
    parser.add_argument("--w2_start", type=float, default=0.1, help="the starting alpha of the --w2_target runs")
    parser.add_argument("--cfg", action="store_true", help="the class-conditional base at guidance 1 and 2")
    for name, value in asdict(defaults).items():
        kind = true_or_false if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value, help=f"every run's {name} (default {value})")
    parser.add_argument("--base", default=None, help="the pixel base (default: the cached one, built if missing)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "results.md"))
    parser.add_argument("--img_dir", default=None, help="default: images/ next to --output")
    parser.add_argument("--json", default=None, help="also write the table and headline results as JSON here")
    args = parser.parse_args(argv)
    if args.one:
        return run_job_file(args.one, run_one)
    if args.reward not in REWARDS:
        parser.error(f"--reward {args.reward!r} is not one of {', '.join(REWARDS)}")
    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import (GENERIC_LABEL, PIXEL_BASE_NAME, PIXEL_COND_BASE_NAME, PixelBuildSettings,
                                            build_pixel_base, ensure_pixel_base, load_pixel_model, sample_pixel_digits,
                                            to_judge_images)  # fmt: skip

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-pixel-sweep-")
    hyper = Hyper(**{name: getattr(args, name) for name in asdict(defaults)})
    alphas = args.alphas or ([0.0, 0.1] if args.cfg else [0.0, 0.05, 0.1, 0.2, 0.5])
    if args.quick:  # one alpha, one seed: 2 or 3 runs of 2 rounds of 8 samples, in this process
        if args.base is None:
            args.base = os.path.join(work, PIXEL_COND_BASE_NAME if args.cfg else PIXEL_BASE_NAME)
            if not os.path.isdir(args.base):
                build_pixel_base(args.base, settings=PixelBuildSettings.mini(conditional=args.cfg), progress=False)
        hyper = Hyper(rounds=2, batch_size=8, num_sampling_steps=2, eval_reward=hyper.eval_reward, hacking_window=2,
                      reward=hyper.reward)  # fmt: skip
        args.num_eval, args.jobs, alphas, args.seeds, args.w2_target = 16, 1, alphas[:1], args.seeds[:1], args.w2_target[:1]
        if argv is None or "--output" not in argv:  # a plumbing run never rewrites docs/
            args.output = os.path.join(work, "results.md")
    base = args.base or ensure_pixel_base(conditional=args.cfg)
    start = time.perf_counter()
    command = ("python -m experiments.digits_pixel_sweep " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.cfg:
        runs = plan_cfg_runs(alphas, args.seeds)
    else:
        runs = plan_runs(alphas, args.seeds, not args.no_control, args.w2_target, args.w2_start)
    print(f"{len(runs)} runs, {args.jobs} at a time, in {work}", flush=True)
    results = run_all(runs, args, hyper, base, work)
    model = load_pixel_model(base)
    base_images = {  # the base's samples, at each guidance of the runs
        (f"base, guidance {g:g}" if args.cfg else "base (no fine-tuning)"): sample_pixel_digits(
            model, args.num_eval, seed=args.eval_seed, num_steps=hyper.num_sampling_steps,
            **({"label": GENERIC_LABEL, "guidance_scale": g} if args.cfg else {}))
        for g in ((1.0, GUIDANCE) if args.cfg else (1.0,))
    }  # fmt: skip
    base_reports = {name: evaluate_images(to_judge_images(images)) for name, images in base_images.items()}
    with open(os.path.join(work, "sweep_results.json"), "w") as f:
        json.dump({"results": results, "base": base_reports, "hyper": asdict(hyper), "command": command,
                   "num_eval": args.num_eval, "eval_seed": args.eval_seed, "jobs": args.jobs}, f)  # fmt: skip

    policy = "full fine-tuning" if hyper.policy == "full" else f"LoRA rank {hyper.rank}"
    settings = (f"{policy}, {hyper.rounds} rounds of {hyper.batch_size} samples (one Adam step each, lr "
                f"{hyper.learning_rate:g}, no warmup, grad clip {hyper.grad_clip:g}), temperature {hyper.temperature:g}, "
                f"weight_normalization {hyper.weight_normalization}, the sampler refreshed every {hyper.refresh} "
                f"round(s) (steps_per_epoch), {hyper.num_sampling_steps} Euler steps for rollouts and evaluation, "
                f"clip_samples {str(hyper.clip_samples).lower()}, reward {hyper.reward}; evaluation: {args.num_eval} "
                f"samples, seed {args.eval_seed}; {args.jobs} run(s) at a time")  # fmt: skip
    img_dir = args.img_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "images")
    img_rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(args.output)))
    headline: dict[str, Any] = {r["spec"]["name"]: summary_line(r) for r in results}
    targets: list[str] = []
    if args.cfg:
        mode, rows = "cfg", table(by_group(results), base_reports, gap=True)
        body = [*markdown_table(rows), "", *grid_lines(results, base_images, img_dir, img_rel, work, "pixel_cond_")]
    elif hyper.eval_reward or args.w2_target:
        mode, rows, targets = "guard", guard_table(results, hyper.rounds, work), check_guard(results, hyper.rounds)
        body = [f"Guards: eval_reward {hyper.eval_reward or 'none'}, hacking_window {hyper.hacking_window}, "
                f"hacking_min_rise {hyper.hacking_min_rise:g}, hacking_min_drop {hyper.hacking_min_drop:g}; "
                f"w2_adapt_rate {hyper.w2_adapt_rate:g}, the budget runs start at alpha {args.w2_start:g}", "",
                *markdown_table(rows), "", "Checks (by the script):", "", *[f"- {t}" for t in targets]]  # fmt: skip
    else:
        mode, rows = "sweep", table(by_group(results), base_reports)
        targets, headline = check_targets(results, args.jobs)
        per_seed = [row[:1] + row[2:] for row in table({r["spec"]["name"]: [r] for r in results}, {})]
        body = [*markdown_table(rows), "", "Per seed:", "", *markdown_table(per_seed), "",
                "Targets (checked by the script):", "", *[f"- {t}" for t in targets], "",
                *grid_lines(results, base_images, img_dir, img_rel, work, "pixel_digits_")]  # fmt: skip
    begin, end, title, mark = SECTIONS[mode]
    write_section(args.output, begin, end, title, [f"Reproduce: `{command}`", "", f"Settings: {settings}", "", *body], mark)
    print("\n".join(targets))
    print(f"{len(results)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s; wrote {args.output}; raw "
          f"results: {work}/sweep_results.json")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": SECTIONS[mode][2].lstrip("# "), "command": "python -m experiments.digits_pixel_sweep", "table": rows,
                       "notes": targets, "results": headline}, f, indent=1)  # fmt: skip
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
