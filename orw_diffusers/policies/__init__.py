"""Policies behind the policy seam (how the trained weights, the sampler and the reference are held)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..keys import check_choice, key_field
from ..models.base import FlowModel
from .base import Policy
from .full import FullPolicy
from .lora import LoRAKeys, LoRAPolicy, validate_lora_keys


@dataclass
class PolicyKeys:
    """How the trained weights, the sampler and the reference are held."""

    policy: Optional[str] = key_field(
        "'lora' (two adapters; reference = adapters off) or 'full' (every weight trained; a frozen reference copy "
        "and a sampler copy). Default: the model's (pipelines: lora; plain velocity models: full).",
        None,
    )


def _lora(cfg: Any, model: FlowModel) -> Policy:
    # the model's default target modules unless the run names them
    targets = cfg.lora_target_modules or model.lora_target_modules
    return LoRAPolicy(cfg.rank, cfg.lora_alpha, targets, getattr(cfg, "lora_dropout", 0.0))


def _full(cfg: Any, model: FlowModel) -> Policy:
    return FullPolicy()


#: the ``policy`` key's values
POLICIES: dict[str, Callable[[Any, FlowModel], Policy]] = {"lora": _lora, "full": _full}


def validate_policy(cfg: Any) -> None:
    """The ``policy`` key and the LoRA keys (checked whichever the policy: a pipeline defaults to LoRA)."""
    validate_lora_keys(cfg)
    if cfg.policy is not None:
        check_choice("policy", cfg.policy, tuple(POLICIES))


def build_policy(cfg: Any, model: FlowModel) -> Policy:
    """The run's policy: ``cfg.policy``, else the model's default (pipelines: LoRA; plain velocity models: full)."""
    name = getattr(cfg, "policy", None) or model.default_policy
    if name not in POLICIES:
        raise ConfigError(f"policy: {name!r} is not one of {', '.join(POLICIES)}")
    return POLICIES[name](cfg, model)


__all__ = [
    "Policy", "LoRAPolicy", "FullPolicy", "POLICIES", "PolicyKeys", "LoRAKeys", "build_policy", "validate_policy",
]  # fmt: skip
