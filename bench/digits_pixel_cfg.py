"""The class-conditional pixel digits base under classifier-free guidance: which field the loss trains.

    python -m bench.digits_pixel_cfg            # guidance 1, and guidance 2 trained both ways; alpha 0 and 0.1, 2 seeds
    python -m bench.digits_pixel_cfg --quick    # plumbing only: the mini base, 2 rounds per run, into a temp dir

Each run is ``ORWCFMTrainer`` with full fine-tuning on a fresh copy of the class-conditional pixel base
(``digits.pixel.ensure_pixel_base(conditional=True)``), the prompt ``GENERIC_LABEL`` ("any digit"), reward
P(even) under the base's CNN, and ``guidance_scale`` 1 or 2 (``null_class: NULL_LABEL``). At guidance 2
the loss trains either the guided velocity that the sampler integrates (``cfg_training: guided``) or the
conditional branch alone (``conditional``). The evaluation samples 1000 digits of the generic label at the
run's guidance, judged by the SVC of ``digits.evaluate_images``; and it measures the *sampled-field gap*:
the mean squared difference between the tuned and the base guided velocities on the run's own samples
(``x_t = t x1 + (1 - t) x0``, t uniform), a distance that means the same thing in both training modes.

The settings are those of ``bench.digits_pixel_sweep`` (its ``Hyper``). The results go into their own
section of docs/results.md, and one grid of 64 samples per run group into docs/images/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from bench.digits_pixel_sweep import (EVEN, GRID_SIDE, W2_LAST_ROUNDS, Hyper, add_run_arguments, entropy_ln5, fine_tune,
                                      run_jobs, trainer_config, write_grid)  # fmt: skip
from bench import markdown_table
from bench.sweep import finish_run, mean_spread, run_job_file, update_results, write_group_grids

BEGIN = "<!-- digits_pixel_cfg: begin (written by python -m bench.digits_pixel_cfg) -->"
END = "<!-- digits_pixel_cfg: end -->"
DISCUSSION_MARK = "### Discussion (class-conditional pixel base)"
GUIDANCE = 2.0


@dataclass(frozen=True)
class CfgRunSpec:
    name: str  # e.g. "g2-guided-alpha0-s1"
    group: str  # the table row it averages into
    guidance: float
    cfg_training: str  # "guided" or "conditional" (the same update at guidance 1)
    alpha: float
    seed: int


def plan_runs(alphas: list[float], seeds: list[int], guidance: float = GUIDANCE) -> list[CfgRunSpec]:
    runs = []
    for a in alphas:
        arms = [(1.0, "guided", f"guidance 1, alpha = {a:g}")]
        arms += [(guidance, mode, f"guidance {guidance:g}, {mode} loss, alpha = {a:g}") for mode in ("guided", "conditional")]
        for g, mode, group in arms:
            tag = f"g{g:g}-{mode}-alpha{a:g}" if g > 1 else f"g1-alpha{a:g}"
            runs += [CfgRunSpec(f"{tag}-s{s}", group, g, mode, a, s) for s in seeds]
    return runs


def cfg_trainer_config(spec: CfgRunSpec, hyper: Hyper, out_dir: str) -> dict[str, Any]:
    from bench.digits_pixel_sweep import RunSpec
    from orw_diffusers.digits.pixel import GENERIC_LABEL, NULL_LABEL

    config = trainer_config(RunSpec(spec.name, spec.group, spec.alpha, spec.seed), hyper, out_dir)
    config.update(prompts=[str(GENERIC_LABEL)], null_class=NULL_LABEL, guidance_scale=spec.guidance,
                  cfg_training=spec.cfg_training)  # fmt: skip
    return config


def guided_velocity(model: Any, t: Any, x: Any, guidance: float) -> Any:
    """The field the sampler integrates for the generic label, in torchcfm's convention."""
    import torch

    from orw_diffusers.digits.pixel import GENERIC_LABEL, NULL_LABEL

    full = torch.full((len(x),), GENERIC_LABEL, dtype=torch.long)
    v = model(t, x, full)
    if guidance > 1:
        v_null = model(t, x, torch.full_like(full, NULL_LABEL))
        v = v_null + guidance * (v - v_null)
    return v


def sampled_field_gap(tuned: Any, base: Any, images: Any, guidance: float, seed: int = 0) -> float:
    """Mean squared difference of the tuned and base guided velocities on ``images``' flow-matching path."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x1 = images * 2 - 1  # [0, 1] -> the model's data range (-1, 1)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(len(x1), generator=g)
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    with torch.no_grad():
        gap = guided_velocity(tuned, t, x_t, guidance) - guided_velocity(base, t, x_t, guidance)
    return gap.pow(2).mean().item()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import (GENERIC_LABEL, load_pixel_model, pixel_digit_reward, sample_pixel_digits,
                                            to_judge_images)  # fmt: skip
    from orw_diffusers.hub import read_metrics

    torch.set_num_threads(job["threads"])
    spec, hyper, base, out_dir = CfgRunSpec(**job["spec"]), Hyper(**job["hyper"]), job["base"], job["out_dir"]
    reward_fn = pixel_digit_reward(base, EVEN)
    tuned, train_seconds = fine_tune(cfg_trainer_config(spec, hyper, out_dir), base, reward_fn, hyper)
    images = sample_pixel_digits(tuned, job["num_eval"], seed=job["eval_seed"], num_steps=hyper.num_sampling_steps,
                                 label=GENERIC_LABEL, guidance_scale=spec.guidance)  # fmt: skip
    rows = read_metrics(out_dir)
    result = {
        "spec": asdict(spec),
        "report": evaluate_images(to_judge_images(images)),
        "reward": reward_fn(images).mean().item(),
        "w2_final": statistics.fmean(r["w2_loss"] for r in rows[-W2_LAST_ROUNDS:]),
        "field_gap": sampled_field_gap(tuned, load_pixel_model(base), images, spec.guidance),
        "rounds": len(rows),
        "train_seconds": train_seconds,
    }
    return finish_run(out_dir, result, images[: GRID_SIDE**2])


def summary_line(result: dict) -> str:
    r = result["report"]
    return (f"P(even) {r['p_even']:.3f}, entropy {entropy_ln5(r):.2f} ln5, rel. confident "
            f"{r['relative_confident_share']:.2f}, W2 {result['w2_final']:.4f}, field gap {result['field_gap']:.4f}, "
            f"{result['train_seconds']:.0f} s")  # fmt: skip


def run_all(runs: list[CfgRunSpec], args: argparse.Namespace, hyper: Hyper, base: str, work: str) -> list[dict]:
    return run_jobs(runs, args, hyper, base, work, "bench.digits_pixel_cfg", run_one, summary_line)


def table(results: list[dict], base_reports: dict[float, dict]) -> list[list[str]]:
    rows = [["run", "seeds", "P(even)", "entropy (ln5)", "rel. conf.", "W2 (trained field)", "sampled-field gap",
             "CNN reward", "histogram 0..9 (%)", "time (s)"]]  # fmt: skip
    for g, rep in base_reports.items():
        rows.append([f"base, guidance {g:g}", "-", f"{rep['p_even']:.3f}", f"{entropy_ln5(rep):.2f}",
                     f"{rep['relative_confident_share']:.2f}", "0", "0", "-",
                     " ".join(str(round(100 * h)) for h in rep["histogram"]), "0"])  # fmt: skip
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["spec"]["group"], []).append(r)
    for group, rs in groups.items():
        col = lambda f, d: mean_spread([f(r) for r in rs], d)  # noqa: E731
        rows.append([group, str(len(rs)), col(lambda r: r["report"]["p_even"], 3), col(lambda r: entropy_ln5(r["report"]), 2),
                     col(lambda r: r["report"]["relative_confident_share"], 2), col(lambda r: r["w2_final"], 4),
                     col(lambda r: r["field_gap"], 4), col(lambda r: r["reward"], 3),
                     " ".join(str(round(100 * statistics.fmean(r["report"]["histogram"][d] for r in rs))) for d in range(10)),
                     col(lambda r: r["train_seconds"], 0)])  # fmt: skip
    return rows


def write_grids(results: list[dict], base_images: dict[float, Any], img_dir: str, work: str) -> dict[str, str]:
    files = {}
    for g, images in base_images.items():
        files[f"base, guidance {g:g}"] = f"pixel_cond_base_g{g:g}.png"
        write_grid(images, os.path.join(img_dir, files[f"base, guidance {g:g}"]))
    return write_group_grids(results, work, img_dir, "pixel_cond_", write_grid, files)


def section_markdown(rows: list[list[str]], grids: dict[str, str], img_rel: str, command: str, settings: str,
                     discussion: str) -> str:  # fmt: skip
    lines = [
        BEGIN, "",
        "## The class-conditional pixel base under classifier-free guidance", "",
        "The same experiment on the class-conditional pixel base (`ensure_pixel_base(conditional=True)`: labels "
        "0..9, 10 = any digit, 11 = the null label of classifier-free guidance; 10% null and 60% generic labels "
        "in pretraining, as the SD3 base's prompt mix), prompted with the generic label and fine-tuned in full "
        "through `ORWCFMTrainer`. At guidance 2 the loss trains the guided velocity (`cfg_training: guided`, the "
        "default) or the conditional branch alone (`conditional`). Samples are drawn at the run's guidance.", "",
        f"Reproduce: `{command}`", "", f"Settings: {settings}", "",
        "W2 (trained field) is `w2_loss` over the last rounds: the guided field's distance in guided runs, the "
        "conditional branch's in conditional ones. The sampled-field gap is one distance for all runs: the mean "
        "squared difference between the tuned and the base *guided* velocity (what the sampler integrates) on "
        "the run's own samples. Other columns as above; mean ± half the range over the seeds.", "",
    ]  # fmt: skip
    lines += markdown_table(rows)
    lines += ["", "Samples (the first seed of each run; the same evaluation noise for all):", "",
              "| " + " | ".join(grids) + " |", "|" + "|".join("---" for _ in grids) + "|",
              "| " + " | ".join(f"![{g}]({img_rel}/{f})" for g, f in grids.items()) + " |", ""]  # fmt: skip
    lines += [DISCUSSION_MARK, "", discussion.strip(), "", END]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    defaults = Hyper()
    parser = argparse.ArgumentParser(prog="python -m bench.digits_pixel_cfg", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="mini base in a temp dir, 2 rounds, 16 eval samples")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help=f"the guided arms' guidance (default {GUIDANCE:g})")
    add_run_arguments(parser, defaults, "the class-conditional pixel base (default: the cached one)")
    args = parser.parse_args(argv)
    if args.guidance <= 1:
        parser.error(f"--guidance: {args.guidance:g} must be > 1 (guidance 1 is always run)")
    if args.one:
        return run_job_file(args.one, run_one)
    import torch

    torch.set_num_threads(args.threads)
    from orw_diffusers.digits.judge import evaluate_images
    from orw_diffusers.digits.pixel import (GENERIC_LABEL, PIXEL_COND_BASE_NAME, PixelBuildSettings, build_pixel_base,
                                            ensure_pixel_base, load_pixel_model, sample_pixel_digits,
                                            to_judge_images)  # fmt: skip

    work = args.work_dir or tempfile.mkdtemp(prefix="digits-pixel-cfg-")
    hyper = Hyper(**{name: getattr(args, name) for name in asdict(defaults)})
    base = args.base
    if args.quick:  # one alpha, one seed: 3 runs of 2 rounds of 8 samples, in this process
        if base is None:
            base = os.path.join(work, PIXEL_COND_BASE_NAME)
            if not os.path.isdir(base):
                build_pixel_base(base, settings=PixelBuildSettings.mini(conditional=True), progress=False)
        hyper = Hyper(rounds=2, batch_size=8, num_sampling_steps=2)
        args.num_eval, args.jobs, args.alphas, args.seeds = 16, 1, args.alphas[:1], args.seeds[:1]
        if argv is None or "--output" not in argv:
            args.output = os.path.join(work, "results.md")
    base = base or ensure_pixel_base(conditional=True)
    start = time.perf_counter()
    command = "python -m bench.digits_pixel_cfg " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = plan_runs(args.alphas, args.seeds, args.guidance)
    print(f"{len(runs)} runs, {args.jobs} at a time, in {work}", flush=True)
    results = run_all(runs, args, hyper, base, work)
    base_model = load_pixel_model(base)
    base_images = {g: sample_pixel_digits(base_model, args.num_eval, seed=args.eval_seed, label=GENERIC_LABEL,
                                          num_steps=hyper.num_sampling_steps, guidance_scale=g)
                   for g in (1.0, args.guidance)}  # fmt: skip
    base_reports = {g: evaluate_images(to_judge_images(images)) for g, images in base_images.items()}
    with open(os.path.join(work, "sweep_results.json"), "w") as f:
        json.dump({"results": results, "base": {str(g): r for g, r in base_reports.items()}, "hyper": asdict(hyper),
                   "command": command.strip()}, f)  # fmt: skip

    rows = table(results, base_reports)
    img_dir = args.img_dir or os.path.join(os.path.dirname(os.path.abspath(args.output)), "images")
    grids = write_grids(results, {g: images[: GRID_SIDE**2] for g, images in base_images.items()}, img_dir, work)
    img_rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(args.output)))
    policy = "full fine-tuning" if hyper.policy == "full" else f"LoRA rank {hyper.rank}"
    settings = (f"{policy}, {hyper.rounds} rounds of {hyper.batch_size} samples (one Adam step each, lr {hyper.learning_rate:g}), "
                f"temperature {hyper.temperature:g}, weight_normalization {hyper.weight_normalization}, the sampler "
                f"refreshed every {hyper.refresh} round(s), {hyper.num_sampling_steps} Euler steps, clip_samples "
                f"{str(hyper.clip_samples).lower()}; evaluation: "
                f"{args.num_eval} samples, seed {args.eval_seed}; {args.jobs} run(s) at a time")  # fmt: skip
    update_results(args.output, lambda discussion: section_markdown(rows, grids, img_rel, command.strip(), settings,
                                                                    discussion),
                   begin=BEGIN, end=END, discussion_mark=DISCUSSION_MARK)  # fmt: skip
    print(f"{len(results)}/{len(runs)} runs done in {time.perf_counter() - start:.0f} s; wrote {args.output} and "
          f"{len(grids)} grids to {img_dir}; raw results: {work}/sweep_results.json")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": "The class-conditional pixel base under CFG", "command": "python -m bench.digits_pixel_cfg",
                       "table": rows, "results": {r["spec"]["name"]: summary_line(r) for r in results}}, f, indent=1)
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
