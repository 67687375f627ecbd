"""What one training loss of an objective runs, asked of the objective itself.

``train_step_passes`` runs the objective's own ``rollout``, ``signal`` and ``losses`` on two tiny samples with fields
that record their calls (no model), and returns the forward passes of one loss in the order the objective makes them:
``"policy"`` (with grad), ``"reference"`` and ``"sampler"`` (no grad). The planner traces those passes at the run's
real shapes, so a new objective, or an option that drops a pass (``kl_beta: 0``), is planned as it trains.
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import Fields, MicroBatch, Objective

#: the passes a loss can make; the planner traces each with the policy's module for it
PASSES = ("policy", "reference", "sampler")
#: the probe's samples: two, so that a group-relative signal has a spread
_PROBE_SAMPLES = 2
_PROBE_SHAPE = (1, 2, 2)


def train_step_passes(objective: Objective, cfg: Any) -> tuple[str, ...]:
    """The forward passes of one loss of ``objective``'s micro-batch, in order (the longest if its losses differ).

    ``cfg``: the run config the objective was built from (``num_sampling_steps``, ``sampling_solver``, ``seed``).
    """
    calls: list[str] = []
    weight = torch.nn.Parameter(torch.ones(()))  # stands for the trained parameters: the policy pass has grad

    def recorded(name: str, scale: float) -> Any:
        def field(latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            if name == "policy":
                return -latents * weight
            with torch.no_grad():
                return -latents * scale

        return field

    indices = torch.arange(_PROBE_SAMPLES)
    noise = torch.randn(_PROBE_SAMPLES, *_PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, cfg.num_sampling_steps + 1)
    with torch.no_grad():
        record = objective.rollout(lambda x, s: -x, noise, sigmas, cfg.sampling_solver, indices, 0)
    signal = objective.signal(torch.arange(_PROBE_SAMPLES, dtype=torch.float32), torch.zeros(_PROBE_SAMPLES).long())
    batch = MicroBatch(round_idx=0, inner_epoch=0, seed=cfg.seed, indices=indices, latents=record.latents,
                       signal=signal.values[indices], extras=record.extras)  # fmt: skip
    fields = Fields(recorded("policy", 1.0), recorded("reference", 0.9),
                    recorded("sampler", 0.8) if objective.needs_sampler() else None)  # fmt: skip
    per_loss: list[tuple[str, ...]] = []
    for step in objective.losses(batch, fields):
        per_loss.append(tuple(calls))
        calls.clear()
        step.loss.backward()
    if not per_loss or "policy" not in max(per_loss, key=len):
        raise RuntimeError(f"objective {objective.name}: its losses make no policy pass ({per_loss})")
    return max(per_loss, key=len)
