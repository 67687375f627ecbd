"""CFG-consistent training's step cost: an optimisation step that trains the guided field over one that
trains the conditional branch alone (``cfg_training: guided`` / ``conditional``, guidance 4.5).

Both are the real ``Trainer.optimise`` on one fixed rollout; the guided step runs the policy and the
reference passes on the unconditional and conditional halves batched, so its forward and backward
batches are twice as large: expect about 2x.

    python -m bench.cfg_training [--quick] [--reps N]
"""

from __future__ import annotations

from typing import Optional, Sequence

from bench.common import Section, Stat, bench_spec, fixed_round, interleaved, ratios, run_main, timing_notes


def run(quick: bool = False, reps: int = 7) -> Section:
    spec = bench_spec(quick)
    with fixed_round(spec, num_prompts=2) as rnd:
        trainer = rnd.trainer
        scale = trainer.sampling_guidance_scale

        def optimise(guidance: float) -> None:
            trainer.training_guidance_scale = guidance  # what cfg_training sets at start-up
            rnd.optimise()

        times = interleaved({"guided": lambda: optimise(scale), "conditional": lambda: optimise(1.0)}, reps=reps)
    step = ratios(times["guided"], times["conditional"])
    table = [
        ["figure", "median (min–max)"],
        ["optimise() training the guided field, s per call", Stat(times["guided"]).fmt(3)],
        ["optimise() training the conditional branch, s per call", Stat(times["conditional"]).fmt(3)],
        ["**step ratio** guided / conditional", step.fmt(3)],
    ]
    notes = [
        f"{spec.describe()}; guidance {scale:g}, batch of 2 per micro-batch, {trainer.sizes.micro_batches_per_process} "
        f"micro-batches per optimise() call, W2 on (policy and reference passes), fp32, 1 thread; {reps} interleaved "
        "repetitions (order rotated).",
        "A round also samples (and decodes, and scores), which guidance already doubled: the whole round grows by "
        "less than the step (docs/results.md measures it on the digits base).",
        *timing_notes(),
    ]
    return Section("CFG-consistent training (optimisation step)", "python -m bench.cfg_training", table, notes,
                   {"step_ratio": step.median, "met": True})  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(run, __doc__, argv, default_reps=9)


if __name__ == "__main__":
    raise SystemExit(main())
