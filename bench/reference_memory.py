"""Benchmark 2, reference memory: peak resident memory of a training step with the W2 reference pass
over the same step without it, against the peer's layout (a deep-copied frozen reference model).

Each variant runs in a fresh process (``--child``): build the trainer, run ``optimise`` once (AdamW
state, lazy initialisation), then reset the kernel's peak-RSS mark and run the measured
``optimise`` on one micro-batch. Variants:

- ``none``: ``w2_coefficient: 0`` — no reference pass;
- ``adapters_off``: ours — the reference is the same transformer with its LoRA adapters disabled;
- ``deep_copy``: the authors' layout — a frozen ``copy.deepcopy`` of the transformer is the reference.

    python -m bench.reference_memory [--quick] [--reps N]
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from bench.common import QUICK, ModelSpec, Section, Stat, fixed_round, load_note, ratios, saved_pipeline
from bench.rss import MeasuredInChildren, peak_rss_of, start_measuring

# Wider and deeper than BENCH so that the frozen weights (~300 MB fp32) weigh against the
# interpreter and libraries (~0.5 GB resident) as the model dominates GPU memory at full scale.
MEMORY = ModelSpec(layers=8, heads=8, head_dim=64)
VARIANTS = ("none", "adapters_off", "deep_copy")
TARGET = 1.05


def _trainer_class():
    from orw_diffusers.trainer import Trainer

    class CopiedReferenceTrainer(Trainer):
        """``optimise`` takes its reference model from ``unwrapped``; here that can be a frozen deep copy."""

        reference_copy: Optional[torch.nn.Module] = None

        @property
        def unwrapped(self) -> torch.nn.Module:
            return self.reference_copy if self.reference_copy is not None else super().unwrapped

    return CopiedReferenceTrainer


def measure(variant: str, spec: ModelSpec) -> dict:
    """Peak RSS of one training micro-batch in this process (run it in a fresh one)."""
    baseline = start_measuring()  # interpreter + torch + diffusers + the library, no model yet
    w2_coefficient = 0.0 if variant == "none" else 1.0
    with fixed_round(spec, num_prompts=1, trainer_class=_trainer_class(), w2_coefficient=w2_coefficient) as rnd:
        rnd.optimise()  # warm-up: optimizer state and lazy initialisation
        if variant == "deep_copy":
            # built before the reset: the peer holds this copy for the whole run
            trainer = rnd.trainer
            trainer.reference_copy = copy.deepcopy(
                trainer.accelerator.unwrap_model(trainer.transformer)
            ).requires_grad_(False)
        rss = peak_rss_of(rnd.optimise)
    return {"variant": variant, "baseline": baseline, "before": rss.before, "peak": rss.peak, "hwm_reset": rss.reset}


CHILDREN = MeasuredInChildren(
    "bench.reference_memory", lambda variant, quick: measure(variant, QUICK if quick else MEMORY), VARIANTS
)


def run(quick: bool = False, reps: int = 5) -> Section:
    spec = QUICK if quick else MEMORY
    saved_pipeline(spec)  # build once, outside the children
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
        for variant in order:  # with --quick in this process: the peak-RSS reset makes that valid enough
            results[variant].append(CHILDREN.result(variant, quick))
    none = results["none"]

    def whole(v: str) -> Stat:
        return ratios([r["peak"] for r in results[v]], [r["peak"] for r in none])

    def above_baseline(v: str) -> Stat:
        return ratios([r["peak"] - r["baseline"] for r in results[v]], [r["peak"] - r["baseline"] for r in none])

    mib = 1 / 2**20
    table = [
        [
            "variant",
            "peak RSS, MiB",
            "ratio to no reference (whole process)",
            "ratio above the interpreter + libraries baseline",
            "target",
            "met",
        ]
    ]
    met = {}
    for v in VARIANTS:
        label = {
            "none": "no reference pass (w2_coefficient 0)",
            "adapters_off": "**ours**: adapters disabled",
            "deep_copy": "peer: deep-copied frozen reference",
        }[v]
        peak = Stat([r["peak"] for r in results[v]]).fmt(0, mib)
        target = f"≤ {TARGET}" if v == "adapters_off" else ""
        met[v] = above_baseline(v).median <= TARGET and whole(v).median <= TARGET
        mark = ("yes" if met[v] else "**no**") if v == "adapters_off" else ""
        table.append([label, peak, whole(v).fmt(3), above_baseline(v).fmt(3), target, mark])
    base = Stat([r["baseline"] for r in none]).fmt(0, mib)
    notes = [
        f"{spec.describe()}; training micro-batch of 2, LoRA rank 16, fp32, 1 thread; {reps} repetitions, "
        + ("all variants in this process (--quick)" if quick else "each variant in a fresh process (order rotated)")
        + ".",
        f"Peak = the kernel's VmHWM over the measured optimise() call, reset just before it (/proc/self/clear_refs); "
        f"glibc is told to return freed blocks of 4 KiB and more at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live "
        f"tensors. The baseline (Python, torch, diffusers, the library, before any model) is {base} MiB; the last "
        f"ratio column subtracts it, which is the GPU-like view (a GPU holds no interpreter).",
        load_note(),
    ]
    if not all(r["hwm_reset"] for rs in results.values() for r in rs):
        notes.append("VmHWM could not be reset here, so the peaks include model loading: the ratios understate.")
    if not met["adapters_off"]:
        notes.append("Target missed: see the adapters-off row.")
    return Section(
        "Reference memory (training step)",
        "python -m bench.reference_memory",
        table,
        notes,
        {
            "adapters_off": above_baseline("adapters_off").median,
            "adapters_off_whole": whole("adapters_off").median,
            "deep_copy": above_baseline("deep_copy").median,
            "deep_copy_whole": whole("deep_copy").median,
            "met": met["adapters_off"],
        },
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    return CHILDREN.main(run, __doc__, argv, default_reps=5)


if __name__ == "__main__":
    raise SystemExit(main())
