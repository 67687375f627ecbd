"""Phase 6 of a round: its scalars (rewards, held-out judges, drift, losses, diversity), one ``.item()`` each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .images import mean_pairwise_distance
from .judges import EVAL_PREFIX, per_sample_rms
from .rollouts import Rollout

if TYPE_CHECKING:
    from .trainer import Trainer

# Diversity is computed on at most this many samples (the first, in global order): pdist is quadratic.
DIVERSITY_MAX_SAMPLES = 512


def round_metrics(
    trainer: Trainer,
    round_idx: int,
    rollout: Rollout,
    global_rewards: torch.Tensor,
    signal_metrics: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
    sampler: dict[str, Any],
) -> dict[str, Any]:
    """The round's scalars, one ``.item()`` each. Collective: every process calls it (the gathers)."""
    t = trainer
    metrics: dict[str, Any] = {
        "epoch": round_idx,
        "reward_mean": global_rewards.mean().item(),
        "reward_std": global_rewards.std(unbiased=False).item(),
        "reward_min": global_rewards.min().item(),
        "reward_max": global_rewards.max().item(),
    }
    for name, values in rollout.components.items():
        metrics[f"reward/{name}_mean"] = t.gather_global(values, rollout.indices).mean().item()
    for name, values in rollout.held_out.items():
        metrics[f"{EVAL_PREFIX}{name}_mean"] = t.gather_global(values, rollout.indices).mean().item()
    metrics["latent_rms"] = t.gather_global(per_sample_rms(rollout.latents), rollout.indices).mean().item()
    nonfinite = t.accelerator.reduce(torch.tensor(rollout.num_nonfinite, device=t.device), reduction="sum")
    metrics["reward_nonfinite"] = int(nonfinite.item())
    metrics.update({k: v.item() for k, v in stats.items() if k != "grad_norm"})
    metrics.update({k: v.item() for k, v in signal_metrics.items()})
    metrics.update(
        {
            "lr": t.lr_scheduler.get_last_lr()[0],
            "grad_norm": stats["grad_norm"].item(),
            "diversity": diversity(t, rollout).item(),
            **sampler,
            "samples_seen": (round_idx + 1) * t.sizes.samples_per_round,
        }
    )
    return metrics


def diversity_space(embed_fn: Any) -> str:
    """Where ``diversity`` is measured, for the start-up log."""
    space = "the reward's embedding" if callable(embed_fn) else "latent"
    return f"mean pairwise L2 distance of a round's samples in {space} space"


def diversity(trainer: Trainer, rollout: Rollout) -> torch.Tensor:
    """Mean pairwise L2 distance of the round's samples over all processes: in the reward's
    embedding space when the reward has ``embed``, else between flattened latents. A collapsing
    policy shows up here before it shows in the reward."""
    local = rollout.embeddings if rollout.embeddings is not None else rollout.latents
    local = local.reshape(len(rollout.indices), -1).float()
    features = trainer.gather_global(local, rollout.indices, to_cpu=False)[:DIVERSITY_MAX_SAMPLES]
    return mean_pairwise_distance(features)
