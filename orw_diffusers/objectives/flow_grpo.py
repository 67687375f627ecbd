"""Flow-GRPO (Liu et al. 2025): SDE rollouts with per-step log-probs, group-relative advantages, and a
PPO-clipped ratio loss per trained step plus a KL term to the adapter-free reference.

The math is in ``sde.py`` and ``loss.py``; this file says what a rollout records and which losses a
micro-batch yields.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .. import streams
from ..errors import ConfigError
from ..flow import euler_step, per_sample_noise, sample_generator
from ..keys import key_field, key_names
from ..loss import clipped_ratio_loss, group_advantages
from ..sampling import VelocityField
from ..sde import KL_TYPES, SDE_TYPES, sde_step, step_kl, window_steps
from .base import Fields, MicroBatch, Objective, RolloutRecord, Signal, StepLoss

logger = logging.getLogger(__name__)

#: a round whose share of masked samples (groups whose rewards are all equal) reaches this is warned about
MASKED_WARNING = 0.5


@dataclass
class FlowGRPOKeys:
    """Flow-GRPO's run-config keys (objective: flow_grpo); DiffusionNFT shares kl_beta, adv_clip_max, global_std."""

    noise_level: float = key_field(
        "a: the SDE's diffusion a sqrt(sigma / (1 - sigma)) on the stochastic steps (cps: std sigma_next sin(a pi/2)).",
        0.7,
    )
    sde_type: str = key_field("'sde' (Flow-GRPO's reverse SDE) or 'cps' (coefficients-preserving sampling).", "sde")
    sde_window_size: int = key_field(
        "Stochastic (and trained) steps per rollout, a window placed at random in sde_window_range each round; "
        "the other steps are Euler. 0: every step but the last.",
        0,
    )
    sde_window_range: Optional[list[int]] = key_field(
        "[low, high]: the steps the SDE window may cover. Default: the first half of the trajectory.", None
    )
    global_std: bool = key_field(
        "Advantages (r - group mean) / std with the std of the whole batch (true) or of the prompt's group "
        "(flow_grpo and diffusion_nft).",
        True,
    )
    adv_clip_max: float = key_field(
        "Advantages are clipped to +-adv_clip_max (flow_grpo and diffusion_nft; diffusion_nft maps the clipped "
        "advantage to r = A / (2 adv_clip_max) + 0.5).",
        5.0,
    )
    clip_range: float = key_field("epsilon of the clipped ratio clip(rho, 1 - epsilon, 1 + epsilon).", 1e-4)
    kl_beta: Optional[float] = key_field(
        "Weight of the KL to the reference (the base model): flow_grpo's of each trained step's transition, "
        "diffusion_nft's mean ||v_theta - v_ref||^2. 0: no reference pass. Default (null): the objective's, 0.04 for "
        "flow_grpo, 1e-4 for diffusion_nft.",
        None,
    )
    kl_type: str = key_field(
        "The KL's scale: 'flow_grpo' (mean squared gap of the two transition means over 2 (a sqrt(sigma/(1-sigma)))^2, "
        "as Flow-GRPO's code, so its kl_beta values carry over) or 'exact' (over 2 std^2, the KL of the two Gaussian "
        "steps: larger by 1 / (sigma - sigma_next) with sde_type: sde; the same with cps).",
        "flow_grpo",
    )


#: the keys of group-relative advantages and the KL weight, declared by Flow-GRPO and read by DiffusionNFT too
ADVANTAGE_KEYS = ("kl_beta", "adv_clip_max", "global_std")


class FlowGRPO(Objective):
    name = "flow_grpo"
    title = "Flow-GRPO"
    card_tag = "flow-grpo"
    card_text = (
        "(Liu et al., 2025). Each round the current model sampled images with a stochastic (SDE) sampler, the reward "
        "scored them, and the {trained} were updated with a clipped likelihood-ratio (PPO) loss on the sampler's "
        "steps, driven by group-relative advantages, with a KL term (`kl_beta`) to the base model."
    )
    card_keys = ("kl_beta", "kl_type", "clip_range", "noise_level", "sde_type", "sde_window_size")
    key_block = FlowGRPOKeys
    config_keys = key_names(FlowGRPOKeys)
    progress_keys = ("kl",)
    key_defaults = {"kl_beta": 0.04}  # Flow-GRPO's SD3.5 configs, on its KL scale (kl_type: flow_grpo)
    scores_sampled_field = True

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.warned_masked = self.logged_batch_level = False

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.sde_type not in SDE_TYPES:
            raise ConfigError(f"sde_type: {cfg.sde_type!r} is not one of {', '.join(SDE_TYPES)}")
        if not 0 < cfg.noise_level <= (1.0 if cfg.sde_type == "cps" else 10.0):
            raise ConfigError(f"noise_level: {cfg.noise_level!r} must be > 0 (and <= 1 with sde_type: cps)")
        if cfg.sampling_solver != "euler":
            raise ConfigError(
                f"sampling_solver: {cfg.sampling_solver!r} is not supported by objective flow_grpo, whose steps "
                f"outside the SDE window are Euler steps; use sampling_solver: euler"
            )
        n = cfg.num_sampling_steps
        if not 0 <= cfg.sde_window_size <= n - 1:
            raise ConfigError(
                f"sde_window_size: {cfg.sde_window_size!r} must be between 0 (every step but the last) and "
                f"num_sampling_steps - 1 = {n - 1}"
            )
        low, high = cls.window_range(cfg)
        if not (0 <= low < high <= n and high - low >= cfg.sde_window_size):
            raise ConfigError(
                f"sde_window_range: {cfg.sde_window_range!r} must be [low, high] with 0 <= low < high <= "
                f"num_sampling_steps ({n}) and room for sde_window_size ({cfg.sde_window_size}) steps"
            )
        for key in ("clip_range", "adv_clip_max"):
            if not getattr(cfg, key) > 0:
                raise ConfigError(f"{key}: {getattr(cfg, key)!r} must be > 0")
        if not (math.isfinite(cfg.kl_beta) and cfg.kl_beta >= 0):
            raise ConfigError(f"kl_beta: {cfg.kl_beta!r} must be >= 0 (0 drops the KL term)")
        if cfg.kl_type not in KL_TYPES:
            raise ConfigError(f"kl_type: {cfg.kl_type!r} is not one of {', '.join(KL_TYPES)}")

    @staticmethod
    def window_range(cfg: Any) -> tuple[int, int]:
        """``sde_window_range``, default the first half of the trajectory."""
        if cfg.sde_window_range is None:
            return 0, max(cfg.num_sampling_steps // 2, cfg.sde_window_size, 1)
        if len(cfg.sde_window_range) != 2:
            raise ConfigError(f"sde_window_range: {cfg.sde_window_range!r} must be two step indices [low, high]")
        return int(cfg.sde_window_range[0]), int(cfg.sde_window_range[1])

    def steps(self, round_idx: int, num_steps: int) -> list[int]:
        """The round's stochastic steps: the same on every process and in every batch of the round."""
        low, high = self.window_range(self.cfg)
        generator = sample_generator(self.cfg.seed, streams.SDE_WINDOW, round_idx)
        return window_steps(num_steps, self.cfg.sde_window_size, low, high, generator)

    def rollout(
        self, field_fn: VelocityField, noise: torch.Tensor, sigmas: torch.Tensor, solver: str,
        indices: torch.Tensor, round_idx: int,
    ) -> RolloutRecord:  # fmt: skip
        """SDE steps inside the window (recording latents before and after, log-prob and sigmas), Euler elsewhere.

        The trajectory is float32 whatever the weight dtype, as Flow-GRPO keeps it: training re-scores the stored
        steps, and a step rounded to bf16/fp16 after its log-prob was taken would give log rho != 0 with identical
        weights (the size of ``clip_range``). x1 is returned in ``noise``'s dtype, as every objective returns it.
        """
        cfg, n = self.cfg, len(noise)
        sigmas = sigmas.to(noise.device)
        stochastic = set(self.steps(round_idx, len(sigmas) - 1))
        sigma_max = sigmas[1].expand(n)
        latents, records = noise.float(), []
        with torch.no_grad():
            for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
                v = field_fn(latents, sigma.expand(n))
                if i not in stochastic:
                    latents = euler_step(latents, v, sigma, sigma_next)
                    continue
                eps = per_sample_noise(tuple(latents.shape[1:]), cfg.seed, (round_idx, streams.SDE_NOISE, i), indices)
                step = sde_step(
                    latents, v, sigma.expand(n), sigma_next.expand(n), cfg.noise_level, sigma_max,
                    noise=eps.to(latents.device), sde_type=cfg.sde_type,
                )  # fmt: skip
                records.append((latents, step.next_latents, step.log_prob, sigma.expand(n), sigma_next.expand(n)))
                latents = step.next_latents
        stack = lambda k: torch.stack([r[k] for r in records], dim=1)  # noqa: E731 - [n, K, ...]
        extras = {
            "step_latents": stack(0), "step_next_latents": stack(1), "step_log_prob": stack(2).cpu(),
            "step_sigma": stack(3).cpu().float(), "step_sigma_next": stack(4).cpu().float(),
            "sigma_max": sigma_max.cpu().float(),
        }  # fmt: skip
        return RolloutRecord(latents=latents.to(noise.dtype), extras=extras)

    def signal(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> Signal:
        """Group-relative advantages; samples of a group whose rewards are all equal are masked (not trained on).
        With no group of two or more (``images_per_prompt: 1``), the batch's statistics, as Flow-GRPO does without
        per-prompt statistics."""
        advantages, keep = group_advantages(rewards, group_ids, self.cfg.global_std, self.cfg.adv_clip_max)
        if not self.logged_batch_level and torch.unique(group_ids, return_counts=True)[1].max() < 2:
            self.logged_batch_level = True
            logger.info("flow_grpo: one sample per prompt: advantages are taken over the whole batch, not per prompt")
        masked = 1 - keep.float().mean()
        if masked >= MASKED_WARNING and not self.warned_masked:
            self.warned_masked = True
            logger.warning(
                "flow_grpo: %.0f%% of a round's samples are masked and not trained on: their prompt's group of "
                "images_per_prompt = %d samples got equal rewards (masked_fraction is logged every round)",
                100 * masked, self.cfg.images_per_prompt,
            )  # fmt: skip
        kept = advantages[keep]
        metrics = {
            "adv_abs_mean": kept.abs().mean() if len(kept) else torch.zeros(()),
            "adv_max": advantages.abs().max(),
            "masked_fraction": masked,
        }
        return Signal(torch.stack([advantages, keep.float()], dim=1), metrics, keep=keep)  # [B, 2]

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def round_latents(self) -> tuple[int, int]:
        # x1 in the weight dtype; the float32 latents before and after each stochastic step
        steps = self.cfg.sde_window_size or self.cfg.num_sampling_steps - 1
        return 1, 2 * steps

    def losses(self, batch: MicroBatch, fields: Fields) -> Iterator[StepLoss]:
        """One loss per trained step, each scaled by 1 / steps so their gradients sum to the mean.

        Masked samples were dropped before micro-batching; a micro-batch's sum is divided by ``train_batch_size``,
        so every trained sample weighs the same in every micro-batch (a row with ``keep`` 0 only pads a short one).
        """
        cfg, ex = self.cfg, batch.extras
        advantages, keep = batch.signal[:, 0].float(), batch.signal[:, 1].float()
        count = float(cfg.train_batch_size)
        num_steps = ex["step_latents"].shape[1]
        device = batch.latents.device
        for k in range(num_steps):
            x, x_next = ex["step_latents"][:, k], ex["step_next_latents"][:, k]
            sigma, sigma_next = ex["step_sigma"][:, k].to(device), ex["step_sigma_next"][:, k].to(device)
            sigma_max, old_log_prob = ex["sigma_max"].to(device), ex["step_log_prob"][:, k].to(device)
            v = fields.policy(x, sigma)
            step = sde_step(x, v, sigma, sigma_next, cfg.noise_level, sigma_max, next_latents=x_next, sde_type=cfg.sde_type)
            policy_loss, ratio = clipped_ratio_loss(step.log_prob, old_log_prob, advantages, cfg.clip_range)
            policy_term = (policy_loss * keep).sum() / count
            kl = gap_v = torch.zeros((), device=device)
            if self.needs_reference():
                v_ref = fields.reference(x, sigma)
                ref_mean = sde_step(
                    x, v_ref, sigma, sigma_next, cfg.noise_level, sigma_max, next_latents=x_next, sde_type=cfg.sde_type
                ).mean
                kl = (step_kl(step, ref_mean, cfg.kl_type) * keep).sum() / count
                # mean ||v - v_ref||^2 at the rollout's states: ORW's w2_loss taken on the SDE trajectory
                gap_v = ((v.detach().float() - v_ref.float()) ** 2).mean()
            loss = policy_term + cfg.kl_beta * kl
            gap = (step.log_prob - old_log_prob).detach()
            kept_mean = lambda t: (t.float() * keep).sum() / keep.sum().clamp_min(1.0)  # noqa: E731 - padding rows out
            yield StepLoss(
                loss / num_steps,
                {
                    "loss": loss.detach(), "policy_loss": policy_term.detach(), "kl": kl.detach(),
                    "velocity_gap": gap_v,
                    "clip_fraction": kept_mean((ratio.detach() - 1).abs() > cfg.clip_range),
                    "approx_kl": kept_mean(0.5 * gap**2), "log_prob_gap": kept_mean(gap),
                    "log_prob_gap_abs": kept_mean(gap.abs()),
                },
            )  # fmt: skip
