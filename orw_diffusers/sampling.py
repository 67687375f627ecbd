"""The velocity field a rollout integrates (with classifier-free guidance), and the ODE sampler over it.

``guided_field`` is the one place where the two CFG branches are batched and combined: the sampler
integrates it, and the objectives train it (``cfg_training: guided``), so the trained field is the
sampled one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch

from .flow import euler_step, guided_velocity
from .models.base import Conditioning, FlowModel

SAMPLING_SOLVERS = ("euler", "heun")

#: ``field(latents [B, *shape], sigmas [B]) -> v [B, *shape]``
VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_field(
    family: FlowModel,
    model: torch.nn.Module,
    cond: Optional[Conditioning],
    uncond: Optional[Conditioning],
    guidance_scale: float,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> VelocityField:
    """The velocity ``model`` samples with: ``v_u + g (v_c - v_u)`` when ``guidance_scale > 1``, else ``v_c``.

    cond/uncond: [B, ...]. With guidance the unconditional and conditional halves run in one batched
    forward, as in the diffusers pipelines. Differentiable: the caller decides about grad.
    """
    use_cfg = guidance_scale > 1.0
    if use_cfg and uncond is None:
        raise ValueError("guided_field: guidance_scale > 1 needs the unconditional embeddings")
    both = Conditioning.cat([uncond, cond]) if use_cfg else cond

    def velocity(latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        sigmas = sigmas.expand(latents.shape[0]) if sigmas.ndim == 0 else sigmas
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        sigma_in = torch.cat([sigmas, sigmas]) if use_cfg else sigmas
        with autocast():
            v = family.predict_velocity(model, model_in, sigma_in, both)
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = guided_velocity(v_uncond, v_cond, guidance_scale)
        return v

    return velocity


@torch.no_grad()
def integrate(field: VelocityField, noise: torch.Tensor, sigmas: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Integrate dx/dsigma = field(x, sigma) from sigmas[0] (~1, noise) to sigmas[-1] (0, data).

    noise: [B, *shape]; sigmas: [N + 1] decreasing. Returns x at sigmas[-1], [B, *shape].
    ``solver="heun"``: Heun's second-order method (the trapezoid of the velocities at both ends of a step),
    an Euler step into sigma = 0 (as in EDM); 2N - 1 model evaluations for N steps.
    """
    if solver not in SAMPLING_SOLVERS:
        raise ValueError(f"integrate: solver {solver!r} is not one of {', '.join(SAMPLING_SOLVERS)}")
    latents = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = field(latents, sigma)
        stepped = euler_step(latents, v, sigma, sigma_next)
        if solver == "heun" and float(sigma_next) > 0:
            v_next = field(stepped, sigma_next)
            stepped = euler_step(latents, (v.float() + v_next.float()) / 2, sigma, sigma_next)
        latents = stepped
    return latents


@torch.no_grad()
def sample_ode(
    family: FlowModel,
    model: torch.nn.Module,
    noise: torch.Tensor,
    cond: Optional[Conditioning],
    uncond: Optional[Conditioning],
    sigmas: torch.Tensor,
    guidance_scale: float,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    solver: str = "euler",
) -> torch.Tensor:
    """The ODE from ``noise`` [B, *latent_shape] (model dtype and device) to clean latents x1 [B, *latent_shape].

    With ``solver="euler"`` the result matches ``pipeline.__call__`` with the same noise.
    """
    field = guided_field(family, model, cond, uncond, guidance_scale, autocast)
    return integrate(field, noise, sigmas, solver)
