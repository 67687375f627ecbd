"""Objectives behind the objective seam. A new objective is one file here plus one entry in ``OBJECTIVES``."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Fields, MicroBatch, Objective, RolloutRecord, Signal, StepLoss
from .flow_grpo import FlowGRPO
from .nft import DiffusionNFT
from .orw import ORWCFMW2

OBJECTIVES: dict[str, type[Objective]] = {
    ORWCFMW2.name: ORWCFMW2, FlowGRPO.name: FlowGRPO, DiffusionNFT.name: DiffusionNFT,
}  # fmt: skip


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective: {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_objective_keys(name: str, keys_set: Any) -> None:
    """A key set by the user that belongs to an objective other than ``name`` is an error."""
    chosen = objective_class(name)
    for other in OBJECTIVES.values():
        if other is chosen:
            continue
        for key in keys_set:
            if key in other.config_keys and key not in chosen.config_keys:
                raise ConfigError(f"{key}: belongs to objective {other.name!r}, but objective is {name!r}")


def validate_objective(cfg: Any) -> None:
    chosen = objective_class(cfg.objective)
    if chosen.scores_sampled_field and cfg.cfg_training == "conditional" and cfg.guidance_scale > 1:
        raise ConfigError(
            f"cfg_training: 'conditional' with guidance_scale {cfg.guidance_scale} is refused by objective "
            f"{cfg.objective!r}: its rollouts are scored under the guided field, so a loss on the conditional branch "
            "is no likelihood ratio; use cfg_training: guided (a guidance-embedding model such as FLUX.1-dev needs no key)"
        )
    chosen.validate(cfg)


def build_objective(cfg: Any) -> Objective:
    return objective_class(cfg.objective)(cfg)


__all__ = [
    "OBJECTIVES", "Objective", "Fields", "MicroBatch", "RolloutRecord", "Signal", "StepLoss",
    "build_objective", "check_objective_keys", "objective_class", "validate_objective",
]  # fmt: skip
