"""Which knob to turn first when a plan does not fit, and the largest batch sizes that do."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .plan import PlanSettings
from .planner import MemoryPlanner


# ------------------------------------------------------------------------------------------------
# Knobs
# ------------------------------------------------------------------------------------------------


def _divisors_desc(n: int, below: int) -> list[int]:
    return [d for d in range(min(n, below), 0, -1) if n % d == 0]


def knob_candidates(
    planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int
) -> list[tuple[str, PlanSettings]]:
    """The knobs in the order to try them (cheapest in quality and speed first), each applied to ``s``."""
    out: list[tuple[str, PlanSettings]] = []
    if not s.prompt_cache:
        out.append(("use the prompt cache (the trainer always does)", replace(s, prompt_cache=True)))
    if s.mixed_precision == "no":
        # the family's own dtypes decide: FLUX refuses fp16 (``FluxFamily.precision_note``)
        half = "fp16" if torch.float16 in planner.arch.family.supported_dtypes else "bf16"
        out.append((f"mixed_precision: {half}", replace(s, mixed_precision=half)))
    reward_models = planner.reward_models(s)[0]
    # a size given with --reward_memory is not scaled by reward_dtype, so only table models count here
    if s.reward_dtype == "float32" and any(rm.given_bytes is None for rm in reward_models):
        out.append(("reward_dtype: float16", replace(s, reward_dtype="float16")))
    if not s.gradient_checkpointing and planner.can_checkpoint:
        out.append(("gradient_checkpointing: true", replace(s, gradient_checkpointing=True)))
    for b in _divisors_desc(s.samples_per_process, s.train_batch_size - 1):
        fits = planner.plan(replace(s, train_batch_size=b), overhead).fits(budget)
        if fits or b == 1:
            out.append(
                (
                    f"train_batch_size: {b} (raise gradient_accumulation_steps to keep the optimizer batch)",
                    replace(s, train_batch_size=b),
                )
            )
            break
    for b in _divisors_desc(s.samples_per_process, s.sample_batch_size - 1):
        fits = planner.plan(replace(s, sample_batch_size=b), overhead).fits(budget)
        if fits or b == 1:
            out.append((f"sample_batch_size: {b}", replace(s, sample_batch_size=b)))
            break
    if reward_models:
        out.append(("reward_device: cpu", replace(s, reward_on_gpu=False)))
    if s.load_t5 and planner.arch.t5_optional:
        out.append(
            ("load_t5: false (T5 context becomes zeros: changes the model's conditioning)", replace(s, load_t5=False))
        )
    return out


@dataclass
class Advice:
    fits: bool
    first_knob: Optional[str]  # None when it fits already
    steps: list[tuple[str, int]]  # (knob, peak after it), applied cumulatively until it fits
    final_fits: bool


def advise(planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int) -> Advice:
    """If the plan does not fit: the first knob that makes it fit by itself; if none does, the
    knobs applied one after another (each kept only if it lowers the peak) until it fits."""
    if planner.plan(s, overhead).fits(budget):
        return Advice(True, None, [], True)
    candidates = knob_candidates(planner, s, budget, overhead)
    for name, changed in candidates:
        peak = planner.plan(changed, overhead).peak
        if peak <= budget:
            return Advice(False, name, [(name, peak)], True)
    steps, current = [], s
    current_peak = planner.plan(s, overhead).peak
    for _ in range(len(candidates)):
        best = None
        for name, changed in knob_candidates(planner, current, budget, overhead):
            peak = planner.plan(changed, overhead).peak
            if peak < current_peak and not any(name == done for done, _ in steps):
                best = (name, changed, peak)
                break
        if best is None:
            break
        steps.append((best[0], best[2]))
        current, current_peak = best[1], best[2]
        if current_peak <= budget:
            break
    return Advice(False, steps[0][0] if steps else None, steps, current_peak <= budget)


def largest_batch_sizes(
    planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int, limit: int = 256
) -> tuple[int, int]:
    """The largest ``train_batch_size`` and ``sample_batch_size`` (each with the other as in ``s``)
    whose plan fits ``budget``; 0 when not even 1 fits. Divisibility by the round size is ignored."""

    def largest(field_name: str) -> int:
        best = 0
        for b in range(1, limit + 1):
            if not planner.plan(replace(s, **{field_name: b}), overhead).fits(budget):
                break
            best = b
        return best

    return largest("train_batch_size"), largest("sample_batch_size")

