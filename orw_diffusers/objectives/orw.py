"""ORW-CFM-W2 (Fan et al., ICLR 2025): reward-weighted flow matching on the policy's own samples,
with a W2 bound to the adapter-free reference. The math is in ``loss.py`` and ``flow.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .. import streams
from ..control import adapt_coefficient
from ..errors import ConfigError
from ..flow import interpolate, per_sample_noise, sample_sigmas, target_velocity
from ..keys import key_field, key_names
from ..loss import effective_sample_size, orw_cfm_w2_loss, reward_weights
from ..sampling import VelocityField, integrate
from .base import Fields, MicroBatch, Objective, RolloutRecord, Signal, StepLoss

WEIGHT_NORMALIZATIONS = ("batch", "per_prompt", "none", "uniform")
SIGMA_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class ORWKeys:
    """ORW-CFM-W2's run-config keys (objective: orw_cfm_w2), the W2 budget's included."""

    w2_coefficient: float = key_field("alpha: weight of the W2 term mean((v_ft - v_ref)^2). 0 = unregularised.", 1.0)
    temperature: float = key_field("tau: reward weights are exp(temperature * reward), normalised.", 0.5)
    weight_normalization: str = key_field(
        "'batch' (mean 1 over the global batch), 'per_prompt' (mean 1 per prompt group), "
        "'none' (raw exp(temperature * r)), 'uniform' (all 1: reward-free control).",
        "batch",
    )
    log_w2_distance: bool = key_field(
        "Run the reference pass even when w2_coefficient is 0, so w2_loss (the W2 bound) is measured.", False
    )
    sigma_sampling: str = key_field(
        "Training sigma distribution: 'uniform' (the paper) or 'logit_normal'. diffusers' weighting_scheme is "
        "read as this key ('none' = uniform, 'logit_normal').",
        "uniform",
    )
    logit_mean: float = key_field("Mean of the logit-normal sigma distribution.", 0.0)
    logit_std: float = key_field("Std of the logit-normal sigma distribution.", 1.0)
    w2_target: Optional[float] = key_field(
        "A W2 budget: each round alpha is multiplied by exp(w2_adapt_rate * clip(log(w2_loss / w2_target), -1, 1)) "
        "(PPO's adaptive KL, for W2), so that the measured w2_loss tracks this value; w2_coefficient is the starting "
        "alpha. null: alpha stays w2_coefficient.",
        None,
    )
    w2_coefficient_min: float = key_field("With w2_target: the smallest alpha the controller may set (> 0).", 1.0e-4)
    w2_coefficient_max: float = key_field("With w2_target: the largest alpha the controller may set.", 100.0)
    w2_adapt_rate: float = key_field(
        "With w2_target: the controller's step; alpha changes by at most a factor exp(w2_adapt_rate) per round.", 0.1
    )


class ORWCFMW2(Objective):
    name = "orw_cfm_w2"
    title = "ORW-CFM-W2"
    card_tag = "orw-cfm-w2"
    card_text = (
        "(Online Reward-Weighted Conditional Flow Matching with Wasserstein-2 regularisation; Fan et al., ICLR 2025). "
        "Each round the current model sampled images, the reward scored them, and the {trained} were fitted to its "
        "own samples weighted by `exp(temperature * reward)`, with a W2 term (`w2_coefficient`) keeping it close to "
        "the base model."
    )
    card_keys = ("w2_coefficient", "temperature", "weight_normalization")
    card_labels = {"w2_coefficient": "`w2_coefficient` (alpha)", "temperature": "`temperature` (tau)"}
    key_block = ORWKeys
    config_keys = key_names(ORWKeys)
    progress_keys = ("w2_loss",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        if cfg.weight_normalization not in WEIGHT_NORMALIZATIONS:
            raise ConfigError(
                f"weight_normalization: {cfg.weight_normalization!r} is not one of {', '.join(WEIGHT_NORMALIZATIONS)}"
            )
        if cfg.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ConfigError(f"sigma_sampling: {cfg.sigma_sampling!r} is not one of {', '.join(SIGMA_SAMPLINGS)}")
        if not math.isfinite(cfg.w2_coefficient) or cfg.w2_coefficient < 0:
            raise ConfigError(f"w2_coefficient: {cfg.w2_coefficient!r} must be >= 0 (0 disables the W2 term)")
        if cfg.weight_normalization != "uniform" and (not math.isfinite(cfg.temperature) or cfg.temperature <= 0):
            raise ConfigError(
                f"temperature: {cfg.temperature!r} must be > 0 with exponential weights "
                f"(weight_normalization={cfg.weight_normalization}); use weight_normalization: uniform for none"
            )
        if cfg.logit_std <= 0:
            raise ConfigError(f"logit_std: {cfg.logit_std!r} must be > 0")
        cls.validate_w2_budget(cfg)

    @staticmethod
    def validate_w2_budget(cfg: Any) -> None:
        if cfg.w2_target is None:
            return
        if not math.isfinite(cfg.w2_target) or cfg.w2_target <= 0:
            raise ConfigError(f"w2_target: {cfg.w2_target!r} must be > 0 (null turns the W2 budget off)")
        low, high = cfg.w2_coefficient_min, cfg.w2_coefficient_max
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ConfigError(f"w2_coefficient_min, w2_coefficient_max: {low!r}, {high!r} must satisfy "
                              f"0 < w2_coefficient_min <= w2_coefficient_max with w2_target set")  # fmt: skip
        if not low <= cfg.w2_coefficient <= high:
            raise ConfigError(f"w2_coefficient: {cfg.w2_coefficient!r} (the starting alpha with w2_target) must lie "
                              f"in [w2_coefficient_min, w2_coefficient_max] = [{low!r}, {high!r}]")  # fmt: skip
        if not (math.isfinite(cfg.w2_adapt_rate) and 0 < cfg.w2_adapt_rate <= 1):
            raise ConfigError(f"w2_adapt_rate: {cfg.w2_adapt_rate!r} must be in (0, 1]")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        # alpha: the config's, or with w2_target the controller's current value (checkpointed)
        self.w2_coefficient = float(cfg.w2_coefficient)

    def rollout(
        self, field_fn: VelocityField, noise: torch.Tensor, sigmas: torch.Tensor, solver: str,
        indices: torch.Tensor, round_idx: int,
    ) -> RolloutRecord:  # fmt: skip
        # ORW trains on the clean samples alone: an ODE rollout, nothing else recorded.
        return RolloutRecord(latents=integrate(field_fn, noise, sigmas, solver))

    def signal(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> Signal:
        weights = reward_weights(rewards, self.cfg.temperature, self.cfg.weight_normalization, group_ids)
        return Signal(weights, {"ess": effective_sample_size(weights), "weight_max": weights.max()})

    def needs_reference(self) -> bool:
        return self.w2_coefficient > 0 or self.cfg.log_w2_distance or self.cfg.w2_target is not None

    def end_round(self, metrics: dict[str, float]) -> dict[str, float]:
        """Logs the alpha this round trained with; with ``w2_target``, adapts it to the round's ``w2_loss``."""
        used, cfg = self.w2_coefficient, self.cfg
        if cfg.w2_target is not None:
            self.w2_coefficient = adapt_coefficient(
                used, metrics["w2_loss"], cfg.w2_target, cfg.w2_adapt_rate, cfg.w2_coefficient_min,
                cfg.w2_coefficient_max,
            )  # fmt: skip
        return {"w2_coefficient": used}

    def state_dict(self) -> dict[str, Any]:
        return {"w2_coefficient": self.w2_coefficient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w2_coefficient = float(state.get("w2_coefficient", self.cfg.w2_coefficient))

    def losses(self, batch: MicroBatch, fields: Fields) -> Iterator[StepLoss]:
        cfg, latents = self.cfg, batch.latents
        shape, keys = tuple(latents.shape[1:]), (batch.round_idx, streams.TRAIN_NOISE, batch.inner_epoch)
        noise = per_sample_noise(shape, batch.seed, keys, batch.indices).to(latents.device, latents.dtype)
        sigmas = sample_sigmas(
            cfg.sigma_sampling, batch.seed, (batch.round_idx, streams.TRAIN_SIGMA, batch.inner_epoch), batch.indices,
            cfg.logit_mean, cfg.logit_std,
        ).to(latents.device)  # fmt: skip
        x_t = interpolate(latents, noise, sigmas)
        v_ref = fields.reference(x_t, sigmas) if self.needs_reference() else None
        v_pred = fields.policy(x_t, sigmas)
        out = orw_cfm_w2_loss(v_pred, target_velocity(latents, noise), v_ref, batch.signal, self.w2_coefficient)
        metrics = {"loss": out.loss.detach(), "fm_loss": out.fm_loss, "weighted_fm_loss": out.weighted_fm_loss,
                   "w2_loss": out.w2_loss, "velocity_rms": rms(v_pred)}  # fmt: skip
        if v_ref is not None:  # drift of the trained field from the base's, on the same states (no extra forward)
            metrics["velocity_rms_ref"] = rms(v_ref)
        yield StepLoss(out.loss, metrics)


def rms(values: torch.Tensor) -> torch.Tensor:
    """Root mean square over every element of [B, ...], detached, float32."""
    return values.detach().float().pow(2).mean().sqrt()
