"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"):
deterministic ODE rollouts from the old policy (the sampler), advantages mapped to an optimality
probability r in [0, 1], and the positive/negative implicit-policy loss on the forward path at the
rollout grid's timesteps; after each round the sampler follows the trained policy by a soft update.

Each piece follows the authors' public code (NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py`` and
``config/nft.py``, ``config/base.py``), named where it is used; the math is in ``loss.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .. import streams
from ..errors import ConfigError
from ..flow import interpolate, per_sample_noise, sample_generator
from ..keys import key_field, key_names
from ..loss import NFT_LOSS_SPACES, diffusion_nft_loss, group_advantages, optimality_probability
from ..sampling import VelocityField, integrate
from .base import Fields, MicroBatch, Objective, RolloutRecord, Signal, StepLoss
from .flow_grpo import ADVANTAGE_KEYS


@dataclass
class NFTKeys:
    """DiffusionNFT's own run-config keys (objective: diffusion_nft); it shares kl_beta, adv_clip_max, global_std."""

    nft_beta: float = key_field(
        "beta: the implicit policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta "
        "(v_old: the sampler's velocity); smaller keeps each update closer to the sampler (a trust region).",
        1.0,
    )
    nft_loss_space: str = key_field(
        "'x0' (the authors' code: ||x0_hat - x0||^2 of each implicit policy over its own sg(mean |x0_hat - x0|)) or "
        "'velocity' (the paper's ||v_implicit - (eps - x0)||^2, unnormalised).",
        "x0",
    )
    nft_timestep_fraction: float = key_field(
        "Trained timesteps per sample and round: int(num_sampling_steps * fraction) (at least 1) of the rollout's "
        "grid, in a random order per sample, each with fresh noise (a forward-backward each).",
        0.99,
    )
    sampler_decay_rate: float = key_field(
        "After each round the sampler (the old policy) moves towards the trained one: sampler <- eta sampler + "
        "(1 - eta) trained, eta = min(sampler_decay_rate * (steps - sampler_decay_start), sampler_decay_max) over "
        "the optimizer steps done (0 before sampler_decay_start). 0: a hard copy every round.",
        0.001,
    )
    sampler_decay_max: float = key_field("The largest eta of the sampler's soft update, in [0, 1).", 0.5)
    sampler_decay_start: int = key_field("Optimizer steps before the sampler's soft update keeps any of the old.", 0)
    nft_negatives: bool = key_field(
        "true (the paper): a sample below its group's mean gets r < 0.5 and is pushed away (the negative policy). "
        "false: its advantage is taken as 0 (r = 0.5, no pull either way), so only the samples above the mean train; "
        "an ablation of what the negative samples add.",
        True,
    )


class DiffusionNFT(Objective):
    name = "diffusion_nft"
    title = "DiffusionNFT"
    card_tag = "diffusion-nft"
    card_text = (
        "(Zheng et al., 2025). Each round the sampler (the old policy) drew images with a deterministic ODE, the "
        "reward scored them, and the {trained} were fitted on the forward process to each image, towards it in "
        "proportion to its group-relative advantage and away from it below the group's mean (an implicit positive "
        "and negative policy, `nft_beta`), with a KL term (`kl_beta`) to the base model; the sampler then followed "
        "the trained weights by a soft update."
    )
    card_keys = ("nft_beta", "kl_beta", "adv_clip_max", "nft_timestep_fraction", "sampler_decay_rate", "sampler_decay_max")
    key_block = NFTKeys
    config_keys = (*key_names(NFTKeys), *ADVANTAGE_KEYS)
    progress_keys = ("kl",)
    # config/base.py: train.beta = 1e-4 (the KL weight; their config.beta = 1 is our nft_beta)
    key_defaults = {"kl_beta": 1e-4}

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if not (math.isfinite(cfg.nft_beta) and cfg.nft_beta > 0):
            raise ConfigError(f"nft_beta: {cfg.nft_beta!r} must be > 0")
        if cfg.nft_loss_space not in NFT_LOSS_SPACES:
            raise ConfigError(f"nft_loss_space: {cfg.nft_loss_space!r} is not one of {', '.join(NFT_LOSS_SPACES)}")
        if not 0 < cfg.nft_timestep_fraction <= 1:
            raise ConfigError(f"nft_timestep_fraction: {cfg.nft_timestep_fraction!r} must be in (0, 1]")
        if not (math.isfinite(cfg.sampler_decay_rate) and cfg.sampler_decay_rate >= 0):
            raise ConfigError(f"sampler_decay_rate: {cfg.sampler_decay_rate!r} must be >= 0 (0: a hard copy)")
        if not 0 <= cfg.sampler_decay_max < 1:
            raise ConfigError(f"sampler_decay_max: {cfg.sampler_decay_max!r} must be in [0, 1) (1 never updates)")
        if cfg.sampler_decay_start < 0:
            raise ConfigError(f"sampler_decay_start: {cfg.sampler_decay_start!r} must be >= 0")
        if cfg.kl_beta is None or not (math.isfinite(cfg.kl_beta) and cfg.kl_beta >= 0):
            raise ConfigError(f"kl_beta: {cfg.kl_beta!r} must be >= 0 (0 drops the KL term and its reference pass)")
        if not (math.isfinite(cfg.adv_clip_max) and cfg.adv_clip_max > 0):
            raise ConfigError(f"adv_clip_max: {cfg.adv_clip_max!r} must be > 0")

    def num_timesteps(self) -> int:
        """Trained timesteps per sample: their ``int(sample.num_steps * train.timestep_fraction)``, at least 1."""
        return max(1, int(self.cfg.num_sampling_steps * self.cfg.nft_timestep_fraction))

    def rollout(
        self, field_fn: VelocityField, noise: torch.Tensor, sigmas: torch.Tensor, solver: str,
        indices: torch.Tensor, round_idx: int,
    ) -> RolloutRecord:  # fmt: skip
        # A deterministic ODE rollout (their sample.deterministic = True); training needs x0 and the grid's timesteps.
        latents = integrate(field_fn, noise, sigmas, solver)
        grid = sigmas[:-1].detach().float().cpu().expand(len(noise), -1).contiguous()  # [n, N], t = 0 excluded
        return RolloutRecord(latents=latents, extras={"grid": grid})

    def signal(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> Signal:
        # Their PerPromptStatTracker: (r - group mean) / (std + 1e-4), global std by default; a group without
        # spread gets A = 0 (r = 0.5) and stays in the batch (their code filters nothing).
        advantages, keep = group_advantages(rewards, group_ids, self.cfg.global_std, self.cfg.adv_clip_max)
        if not self.cfg.nft_negatives:  # at v = v_old the gradient is -A times the matching gradient: A = 0 is none
            advantages = advantages.clamp(min=0.0)
        r = optimality_probability(advantages, self.cfg.adv_clip_max)
        metrics = {
            "adv_abs_mean": advantages.abs().mean(), "r_mean": r.mean(),
            "zero_std_fraction": 1 - keep.float().mean(),
        }  # fmt: skip
        return Signal(r, metrics)

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def needs_sampler(self) -> bool:
        return True

    def sampler_decay(self, optimizer_steps: int) -> float:
        """eta after ``optimizer_steps`` steps: their ``return_decay`` (decay_type 1: min(0.001 step, 0.5))."""
        cfg = self.cfg
        if optimizer_steps < cfg.sampler_decay_start:
            return 0.0
        return min(cfg.sampler_decay_rate * (optimizer_steps - cfg.sampler_decay_start), cfg.sampler_decay_max)

    def follow(self, policy: Any, module: torch.nn.Module, round_idx: int, optimizer_steps: int) -> dict[str, Any]:
        """theta_old <- eta theta_old + (1 - eta) theta after the round (their train_nft_sd3.py, end of an epoch)."""
        if (round_idx + 1) % self.cfg.sampler_update_interval:
            return {"sampler_refreshed": False}
        eta = self.sampler_decay(optimizer_steps)
        policy.soft_update(module, eta)
        return {"sampler_refreshed": True, "sampler_decay": eta}

    def timestep_order(self, batch: MicroBatch, num_grid: int) -> torch.Tensor:
        """Each sample's permutation of the grid's indices, [b, num_grid] (their per-sample ``randperm``)."""
        keys = (batch.seed, batch.round_idx, streams.NFT_TIMESTEPS, batch.inner_epoch)
        return torch.stack([torch.randperm(num_grid, generator=sample_generator(*keys, int(i))) for i in batch.indices])

    def losses(self, batch: MicroBatch, fields: Fields) -> Iterator[StepLoss]:
        """One loss per trained timestep, each scaled by 1 / K so their gradients sum to the mean (their
        ``effective_grad_accum_steps`` counts the timesteps)."""
        cfg, latents = self.cfg, batch.latents
        if fields.sampler is None:
            raise RuntimeError("diffusion_nft needs the sampler's field (Fields.sampler)")
        grid = batch.extras["grid"]  # [b, N]
        order = self.timestep_order(batch, grid.shape[1])
        num_steps = min(self.num_timesteps(), grid.shape[1])
        shape = tuple(latents.shape[1:])
        r = batch.signal.float()
        for k in range(num_steps):
            sigmas = grid.gather(1, order[:, k : k + 1]).squeeze(1).to(latents.device)  # [b]
            keys = (batch.round_idx, streams.TRAIN_NOISE, batch.inner_epoch, k)
            noise = per_sample_noise(shape, batch.seed, keys, batch.indices).to(latents.device, latents.dtype)
            x_t = interpolate(latents, noise, sigmas)  # (1 - t) x0 + t eps, fresh eps
            v_old = fields.sampler(x_t, sigmas)
            v_ref = fields.reference(x_t, sigmas) if self.needs_reference() else None
            v_pred = fields.policy(x_t, sigmas)
            # scale = adv_clip_max: their policy_loss = (ori_policy_loss * adv_clip_max).mean()
            out = diffusion_nft_loss(
                v_pred, v_old, v_ref, latents, x_t, sigmas, r, cfg.nft_beta, cfg.kl_beta, cfg.adv_clip_max,
                cfg.nft_loss_space,
            )  # fmt: skip
            yield StepLoss(
                out.loss / num_steps,
                {"loss": out.loss.detach(), "policy_loss": out.policy_loss, "positive_loss": out.positive_loss,
                 "negative_loss": out.negative_loss, "kl": out.kl, "old_gap": out.old_gap},
            )  # fmt: skip
