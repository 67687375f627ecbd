"""Pure tensor math of Flow-GRPO's stochastic sampler (Liu et al. 2025, arXiv 2505.05470).

Diffusers' convention: sigma = 1 is noise, sigma = 0 is data; a step goes from ``sigma`` to
``sigma_next < sigma`` (dt = sigma_next - sigma < 0) with the velocity ``v`` of the field being
sampled (after CFG). Everything is computed in float32: the variance terms overflow in bf16.

- ``sde``: the reverse-time SDE with the same marginals as the ODE, diffusion ``a sqrt(sigma / (1 - sigma))``;
  its Euler-Maruyama step is Gaussian with mean ``x + [v + std^2 / (2 sigma) (x + (1 - sigma) v)] dt``
  and std ``std sqrt(-dt)``.
- ``cps``: the coefficients-preserving form, std ``sigma_next sin(a pi / 2)``; its log-prob is
  ``-mean((x' - mean)^2)`` (a Gaussian log-density up to its constant and scale).

Log-probs are averaged over a sample's elements, not summed, as the reference implementation does.
With ``a = 0`` both steps are exactly the Euler ODE step.

The KL of a trained step to the reference's step (``step_kl``) is ``mean((mean - mean_ref)^2) / (2 s^2)`` with
``s`` either the transition's std (``kl_type: exact``, the KL of the two Gaussians) or, as in Flow-GRPO's code
(``scripts/train_sd3.py``: ``/ (2 * std_dev_t ** 2)``), the diffusion ``a sqrt(sigma / (1 - sigma))`` without
``sqrt(-dt)`` (``kl_type: flow_grpo``, the default, so that a Flow-GRPO config's ``kl_beta`` means the same here).
For ``cps`` the two are the same: its ``std_dev_t`` is the transition's std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SDE_TYPES = ("sde", "cps")
KL_TYPES = ("flow_grpo", "exact")


@dataclass
class SDEStep:
    """One stochastic step: the next latents and the Gaussian transition that produced them."""

    next_latents: torch.Tensor  # [B, ...] float32
    mean: torch.Tensor  # [B, ...] float32, the transition mean (differentiable through v)
    std: torch.Tensor  # [B] float32, the transition std (0 for a = 0)
    noise_scale: torch.Tensor  # [B] float32, Flow-GRPO's std_dev_t: sde: a sqrt(sigma / (1 - sigma)); cps: std
    log_prob: torch.Tensor  # [B] float32, log p(next_latents | latents), mean over elements


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def sde_step(
    latents: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    sigma_max: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    next_latents: Optional[torch.Tensor] = None,
    sde_type: str = "sde",
) -> SDEStep:
    """One step from ``sigma`` [B] to ``sigma_next`` [B] of latents/v [B, ...].

    Give ``noise`` (standard normal [B, ...]) to draw the next latents, or ``next_latents`` to score
    given ones (training re-scores the rollout's). ``sigma_max`` [B]: the sigma of the step after
    the first, used in place of sigma = 1 in ``sqrt(sigma / (1 - sigma))``.
    """
    if (noise is None) == (next_latents is None):
        raise ValueError("sde_step: give exactly one of noise (to sample) or next_latents (to score)")
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_step: sde_type {sde_type!r} is not one of {', '.join(SDE_TYPES)}")
    x, v = latents.float(), v.float()
    sigma, sigma_next, sigma_max = sigma.float(), sigma_next.float(), sigma_max.float()
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    if sde_type == "sde":
        dt = s_next - s
        denominator = 1 - torch.where(s == 1, _col(sigma_max, x), s)
        diffusion = noise_level * torch.sqrt(s / denominator)
        mean = x + (v + diffusion**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = diffusion * torch.sqrt(-dt)
        noise_scale = diffusion
    else:
        std = noise_scale = s_next * math.sin(noise_level * math.pi / 2)
        x0, x1 = x - s * v, x + (1 - s) * v
        mean = (1 - s_next) * x0 + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1
    if next_latents is None:
        next_latents = mean + std * noise.float()
    target = next_latents.detach().float()
    dims = tuple(range(1, x.ndim))
    if sde_type == "sde":
        safe = std.clamp_min(torch.finfo(torch.float32).tiny)
        log_density = -((target - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
        log_prob = log_density.mean(dim=dims)
    else:
        log_prob = -((target - mean) ** 2).mean(dim=dims)
    per_sample = lambda t: t.reshape(len(x), -1)[:, 0]  # noqa: E731 - [B, 1, ...] -> [B]
    return SDEStep(next_latents, mean, per_sample(std), per_sample(noise_scale.expand_as(std)), log_prob)


def step_kl(step: SDEStep, ref_mean: torch.Tensor, kl_type: str = "flow_grpo") -> torch.Tensor:
    """The KL term [B] of a trained step against the reference's transition mean ``ref_mean`` [B, ...] (same std):
    ``mean over elements of (mean - ref_mean)^2 / (2 s^2)``, s = ``step.std`` (exact) or ``step.noise_scale`` (flow_grpo)."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"step_kl: kl_type {kl_type!r} is not one of {', '.join(KL_TYPES)}")
    scale = step.std if kl_type == "exact" else step.noise_scale
    dims = tuple(range(1, step.mean.ndim))
    return ((step.mean - ref_mean.float()) ** 2).mean(dim=dims) / (2 * scale.clamp_min(1e-12) ** 2)


def window_steps(num_steps: int, size: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """The indices of the stochastic (and trained) steps of a round: ``size`` consecutive steps starting
    at a random step in ``[low, high - size]``; ``size = 0``: every step but the last."""
    if size == 0:
        return list(range(num_steps - 1))
    start = low + int(torch.randint(high - size - low + 1, (1,), generator=generator))
    return list(range(start, start + size))
