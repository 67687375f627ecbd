"""Pure tensor math of the conditional flow path (diffusers' convention: sigma=1 noise, sigma=0 data).

Nothing here imports diffusers, accelerate or the config: tensors in, tensors out.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``, e.g. ``(seed, round, stream, global_index)``.

    Every random draw of one sample comes from its own generator, so results do not depend on
    the number of processes or on how samples are split into batches.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]).generate_state(2)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def per_sample_noise(
    shape: tuple[int, ...], seed: int, keys: tuple[int, ...], indices: list[int] | torch.Tensor
) -> torch.Tensor:
    """Standard normal noise ``[len(indices), *shape]``; row i drawn from ``sample_generator(seed, *keys, indices[i])``."""
    rows = [torch.randn(shape, generator=sample_generator(seed, *keys, int(i))) for i in indices]
    return torch.stack(rows)


def sample_sigmas(
    scheme: str,
    seed: int,
    keys: tuple[int, ...],
    indices: list[int] | torch.Tensor,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training sigmas ``[B]`` in (0, 1), one per sample, from the sample's own generator.

    - ``uniform``: sigma ~ U(0, 1), the paper's choice.
    - ``logit_normal``: sigma = sigmoid(N(logit_mean, logit_std)), the same density as diffusers'
      ``compute_density_for_timestep_sampling(weighting_scheme="logit_normal")``.
    """
    gens = [sample_generator(seed, *keys, int(i)) for i in indices]
    if scheme == "uniform":
        return torch.cat([torch.rand(1, generator=g) for g in gens])
    if scheme == "logit_normal":
        z = torch.cat([torch.randn(1, generator=g) for g in gens])
        return torch.sigmoid(logit_mean + logit_std * z)
    raise ValueError(f"sigma scheme {scheme!r} is not one of uniform, logit_normal")


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x1 + sigma * eps.  latents, noise: [B, ...]; sigmas: [B]."""
    s = _expand(sigmas, latents)
    return (1.0 - s) * latents + s * noise


def target_velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u = d x_sigma / d sigma = eps - x1.  [B, ...]."""
    return noise - latents


def euler_step(
    latents: torch.Tensor, v_pred: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of dx/dsigma = v from sigma to sigma_next, in fp32 like diffusers' scheduler."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    out = latents.float() + dt.to(latents.device) * v_pred.float()
    return out.to(latents.dtype)


def guided_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + g * (v_c - v_u)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)
