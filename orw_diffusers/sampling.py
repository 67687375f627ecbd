"""Euler ODE sampler with classifier-free guidance, over any model family."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch

from .flow import euler_step, guided_velocity
from .models.base import Conditioning, FlowFamily


@torch.no_grad()
def euler_sample(
    family: FlowFamily,
    model: torch.nn.Module,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Optional[Conditioning],
    sigmas: torch.Tensor,
    guidance_scale: float,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] (~1, noise) to sigmas[-1] (0, data).

    noise: [B, *latent_shape] in the model dtype, on the model device; cond/uncond: [B, ...];
    sigmas: [N + 1] decreasing. Returns the clean latents x1 [B, *latent_shape].
    With guidance the unconditional and conditional halves run in one batched forward, as in the
    diffusers pipelines, so the result matches ``pipeline.__call__`` with the same noise.
    """
    use_cfg = guidance_scale > 1.0
    if use_cfg and uncond is None:
        raise ValueError("euler_sample: guidance_scale > 1 needs the unconditional embeddings")
    both = Conditioning.cat([uncond, cond]) if use_cfg else cond
    latents = noise
    for i in range(len(sigmas) - 1):
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        t = sigmas[i].expand(model_in.shape[0])
        with autocast():
            v = family.predict_velocity(model, model_in, t, both)
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = guided_velocity(v_uncond, v_cond, guidance_scale)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
    return latents
