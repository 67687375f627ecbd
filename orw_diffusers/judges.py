"""Held-out judges (``eval_reward``), cheap drift signals and the reward-hacking alarm of a run.

The judges score every round's samples (and the validation renders) after the training reward, under
``no_grad`` on detached images: their scores are logged as ``eval/<name>_mean`` and never reach the
training signal. The alarm's rule is ``control.hacking_alarm``; its history is checkpointed so that a
resumed run raises it in the same round as an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .control import hacking_alarm, window_change
from .errors import ConfigError
from .keys import key_field

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
ALARM_METRIC = "hacking_alarm"


@dataclass
class JudgeKeys:
    """The run-config keys of the held-out judges and the reward-hacking alarm (every objective)."""

    eval_reward: Any = key_field(
        "Held-out rewards (the syntax of reward), scored on every round's samples and on the validation renders "
        "and logged as eval/<name>_mean; never trained on. null: none.",
        None,
    )
    hacking_window: int = key_field(
        "Rounds the reward-hacking alarm looks back over: it fires when, over the last hacking_window rounds, the "
        "training reward's least-squares change is >= hacking_min_rise while an eval_reward's is <= -hacking_min_drop.",
        20,
    )
    hacking_min_rise: float = key_field(
        "The alarm's least rise of the mean training reward over the window, in its units (0: it did not fall; a "
        "hacked reward often saturates before the judges fall).",
        0.0,
    )
    hacking_min_drop: float = key_field(
        "The alarm's least fall of a mean eval_reward over the window, in its units; set it above the judge's noise "
        "(docs/results.md: 0.1 for a [0, 1] judge on 128 samples per round).",
        0.1,
    )
    stop_on_reward_hacking: bool = key_field(
        "When the alarm fires, save a checkpoint, the weights and the model card, and end the run.", False
    )


def validate_judges(cfg: Any) -> None:
    """The ``eval_reward`` spec (names and weights, nothing loaded) and the alarm's keys; one-line errors."""
    from .rewards import parse_reward_spec

    if cfg.eval_reward is not None:
        try:
            parse_reward_spec(cfg.eval_reward)
        except ConfigError as e:
            raise ConfigError(f"eval_reward: {str(e).removeprefix('reward: ')}") from None
    if cfg.hacking_window < 2:
        raise ConfigError(f"hacking_window: {cfg.hacking_window!r} must be an integer >= 2 (rounds)")
    for name in ("hacking_min_rise", "hacking_min_drop"):
        value = getattr(cfg, name)
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"{name}: {value!r} must be a finite number >= 0")
    if cfg.stop_on_reward_hacking and cfg.eval_reward is None:
        raise ConfigError("stop_on_reward_hacking: true needs an eval_reward to compare the training reward with")


def per_sample_rms(latents: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n] float32: the root mean square of each sample (a drift signal: saturation shows here)."""
    return latents.detach().float().reshape(len(latents), -1).pow(2).mean(1).sqrt()


class Judges:
    """``reward``: the built ``eval_reward`` (a ``CompositeReward``), or None for a run without judges."""

    def __init__(self, cfg: Any, reward: Optional[Any]):
        self.cfg, self.reward = cfg, reward
        self.train_means: list[float] = []  # the last hacking_window rounds, oldest first
        self.held_out_means: dict[str, list[float]] = {}
        self.fired_at: Optional[int] = None  # the first round the alarm fired

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """name -> [n] float32 CPU scores of ``images`` [n, 3, H, W] in [0, 1]; {} without judges."""
        if self.reward is None:
            return {}
        with torch.no_grad():
            return dict(self.reward(images.detach(), list(prompts)).components)

    def observe(self, round_idx: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Feed a round's ``reward_mean`` and ``eval/<name>_mean``; returns ``{hacking_alarm: 0 or 1}``
        (nothing without judges). Warns once, the first time the rule holds."""
        if self.reward is None:
            return {}
        window = self.cfg.hacking_window
        self.train_means = (self.train_means + [metrics["reward_mean"]])[-window:]
        for key, value in metrics.items():
            if key.startswith(EVAL_PREFIX) and key.endswith("_mean"):
                name = key[len(EVAL_PREFIX) : -len("_mean")]
                self.held_out_means[name] = (self.held_out_means.get(name, []) + [value])[-window:]
        name = hacking_alarm(self.train_means, self.held_out_means, window, self.cfg.hacking_min_rise,
                             self.cfg.hacking_min_drop)  # fmt: skip
        if name is not None and self.fired_at is None:
            self.fired_at = round_idx
            logger.warning(
                "reward-hacking alarm in round %d: over rounds %d-%d the training reward rose by %.4g while the "
                "held-out %s fell by %.4g (hacking_window %d, hacking_min_rise %g, hacking_min_drop %g)%s",
                round_idx, round_idx - window + 1, round_idx, window_change(self.train_means), name,
                -window_change(self.held_out_means[name]), window, self.cfg.hacking_min_rise, self.cfg.hacking_min_drop,
                "; stopping (stop_on_reward_hacking)" if self.cfg.stop_on_reward_hacking else "",
            )  # fmt: skip
        return {ALARM_METRIC: float(name is not None)}

    def stop_requested(self) -> bool:
        return self.cfg.stop_on_reward_hacking and self.fired_at is not None

    def state_dict(self) -> dict[str, Any]:
        return {"train_means": list(self.train_means), "held_out_means": {k: list(v) for k, v in self.held_out_means.items()},
                "fired_at": self.fired_at}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_means = list(state.get("train_means", []))
        self.held_out_means = {k: list(v) for k, v in state.get("held_out_means", {}).items()}
        self.fired_at = state.get("fired_at")
