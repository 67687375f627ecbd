"""Policies behind the policy seam (how the trained weights, the sampler and the reference are held)."""

from __future__ import annotations

from typing import Any

from ..models.base import FlowModel
from .base import Policy
from .lora import LoRAPolicy


def build_policy(cfg: Any, model: FlowModel) -> Policy:
    """The run's policy: LoRA adapters on the model's denoiser (its default target modules unless set)."""
    return LoRAPolicy(cfg.rank, cfg.lora_alpha, cfg.lora_target_modules or model.lora_target_modules)


__all__ = ["Policy", "LoRAPolicy", "build_policy"]
