"""Pure tensor math of the ORW-CFM-W2 objective: reward weights and the regularised loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# exp() of more than this overflows float32; only the raw 'none' normalisation can get there.
_MAX_EXPONENT = 80.0


def reward_weights(
    rewards: torch.Tensor,
    temperature: float,
    normalization: str = "batch",
    group_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample weights from rewards ``[B]`` (the global batch). Returns float32 ``[B]``.

    - ``batch``: ``B * softmax(temperature * r)``, i.e. exp(temperature * r) over its batch mean (mean 1).
    - ``per_prompt``: the same within each group of ``group_ids`` (mean 1 per group).
    - ``none``: raw ``exp(temperature * r)`` as the authors' code; the exponent is capped at 80 so
      the weight stays finite.
    - ``uniform``: all ones (a reward-free control; the rewards are still logged).
    Softmax subtracts the max first, so rewards of +-1e4 stay finite.
    """
    r = rewards.detach().float()
    if not torch.isfinite(r).all():
        raise ValueError("reward_weights: rewards must be finite; clean non-finite rewards before weighting")
    if normalization == "uniform":
        return torch.ones_like(r)
    logits = temperature * r
    if normalization == "batch":
        return r.numel() * torch.softmax(logits, dim=0)
    if normalization == "none":
        return torch.exp(logits.clamp(max=_MAX_EXPONENT))
    if normalization == "per_prompt":
        if group_ids is None:
            raise ValueError("reward_weights: per_prompt normalisation needs group_ids")
        weights = torch.empty_like(r)
        for g in torch.unique(group_ids):
            mask = group_ids == g
            weights[mask] = mask.sum() * torch.softmax(logits[mask], dim=0)
        return weights
    raise ValueError(f"weight normalisation {normalization!r} is not one of batch, per_prompt, none, uniform")


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2: B for equal weights, 1 when one sample takes all the weight."""
    w = weights.float()
    return w.sum() ** 2 / (w**2).sum().clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class LossOutput:
    """The batch loss and its parts (all scalars, still on device; no sync until logging)."""

    loss: torch.Tensor  # mean_i [ w_i * fm_i + alpha * w2_i ]
    fm_loss: torch.Tensor  # mean_i fm_i  (unweighted, for logging)
    weighted_fm_loss: torch.Tensor  # mean_i w_i * fm_i
    w2_loss: torch.Tensor  # mean_i ||v_ft - v_ref||^2 (per-element mean); bounds W2(ft, ref)
    ess: torch.Tensor  # effective sample size of the weights of this batch


def orw_cfm_w2_loss(
    v_pred: torch.Tensor,
    v_target: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    weights: torch.Tensor,
    w2_coefficient: float,
) -> LossOutput:
    """ORW-CFM-W2 per-sample loss ``w_i * mean((v_ft - u)^2) + alpha * mean((v_ft - v_ref)^2)``, averaged.

    v_pred, v_target, v_ref: [B, ...]; weights: [B]. The W2 term is not reward-weighted.
    ``v_ref`` may be None only when ``w2_coefficient == 0`` (then no reference pass is needed).
    Computed in float32 whatever the model dtype.
    """
    v_pred = v_pred.float()
    dims = tuple(range(1, v_pred.ndim))
    fm = ((v_pred - v_target.float()) ** 2).mean(dim=dims)
    weights = weights.to(fm.device, torch.float32)
    weighted = weights * fm
    if v_ref is None:
        if w2_coefficient != 0:
            raise ValueError("orw_cfm_w2_loss: v_ref is required when w2_coefficient > 0")
        w2 = torch.zeros_like(fm)
    else:
        w2 = ((v_pred - v_ref.float()) ** 2).mean(dim=dims)
    per_sample = weighted + w2_coefficient * w2
    return LossOutput(
        loss=per_sample.mean(),
        fm_loss=fm.detach().mean(),
        weighted_fm_loss=weighted.detach().mean(),
        w2_loss=w2.detach().mean(),
        ess=effective_sample_size(weights),
    )


# --- Flow-GRPO -----------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = True, clip: float = 5.0, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of the global batch: ``(r - mean of the group) / (std + eps)``, clipped to ±clip.

    rewards, group_ids: [B]. The std is the whole batch's (``global_std``) or the group's. Returns
    ``(advantages [B], keep [B] bool)``: a group whose rewards are all equal, or a group of one beside
    larger groups, carries no signal, so its samples are masked (``keep`` False, advantage 0). When no
    group has two samples (one image per prompt), the batch is the group: ``(r - batch mean) / (batch std + eps)``.
    """
    r = rewards.detach().float()
    if torch.unique(group_ids, return_counts=True)[1].max() < 2:
        group_ids = torch.zeros_like(group_ids)
    advantages = torch.zeros_like(r)
    keep = torch.ones_like(r, dtype=torch.bool)
    batch_std = r.std(unbiased=False)
    for g in torch.unique(group_ids):
        mask = group_ids == g
        group = r[mask]
        spread = group.std(unbiased=False)
        if group.numel() < 2 or spread == 0:
            keep[mask] = False
            continue
        std = batch_std if global_std else spread
        advantages[mask] = (group - group.mean()) / (std + eps)
    return advantages.clamp(-clip, clip), keep


def clipped_ratio_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per sample: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, rho = exp(logp - logp_old).

    All [B]. Returns ``(loss [B], rho [B])``.
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio
