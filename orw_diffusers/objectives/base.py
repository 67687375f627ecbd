"""The objective seam: what a rollout records, how rewards become the training signal, and the
losses of one micro-batch. The round loop talks to this interface only and never names an objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional

import torch

from ..sampling import VelocityField

if TYPE_CHECKING:
    from ..policies.base import Policy


@dataclass
class RolloutRecord:
    """What the objective's sampler returns for one sample batch."""

    latents: torch.Tensor  # [n, *latent_shape] clean x1
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, ...], objective-specific


@dataclass
class Signal:
    """The training signal of the global batch, computed from its rewards."""

    values: torch.Tensor  # [B] float32 CPU, global sample order (ORW: weights)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, logged once per round
    #: [B] bool: the samples to train on (None: all). The others are dropped before micro-batching.
    keep: Optional[torch.Tensor] = None


@dataclass
class MicroBatch:
    """One training micro-batch on this process; every tensor is on the training device."""

    round_idx: int
    inner_epoch: int
    seed: int
    indices: torch.Tensor  # [b] long, global sample indices (the keys of per-sample random streams)
    latents: torch.Tensor  # [b, *latent_shape] clean x1
    signal: torch.Tensor  # [b] this batch's rows of Signal.values
    extras: dict[str, torch.Tensor]  # rows of RolloutRecord.extras


@dataclass
class StepLoss:
    """One loss to back-propagate, with its own metrics (detached scalars, averaged over the round)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass
class Fields:
    """The trained velocity field of a micro-batch: the policy's (with grad), the reference's (no grad) and,
    when the objective asks for it (``needs_sampler``), the sampler's (the old policy, no grad).

    All are the field the sampler integrates (guided or not, as the run trains it), for the
    micro-batch's conditioning.
    """

    policy: VelocityField
    reference: VelocityField
    sampler: Optional[VelocityField] = None


class Objective(ABC):
    """One training objective. Its config keys are its own: a key of another objective is an error."""

    name: ClassVar[str]
    #: the method's name as a model card and a Hub commit say it
    title: ClassVar[str]
    #: what the model card says the method did, after "fine-tuned online towards a reward with <title>"
    card_text: ClassVar[str] = ""
    #: the card's tag for the method
    card_tag: ClassVar[str] = ""
    #: the settings the model card lists (default: every key of the objective), and labels for some of them
    card_keys: ClassVar[tuple[str, ...]] = ()
    card_labels: ClassVar[dict[str, str]] = {}
    #: True when the loss re-scores a rollout under the field it was sampled from (a likelihood ratio): the trained
    #: field must then be the sampled one, so ``cfg_training: conditional`` with true CFG is refused
    scores_sampled_field: ClassVar[bool] = False
    #: the dataclass of ``keys.key_field`` fields that declares this objective's own run-config keys (None: none)
    key_block: ClassVar[Optional[type]] = None
    #: the run-config keys that belong to this objective: its ``keys``, and any it shares with another objective
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: metrics shown on the rounds progress bar, besides the reward
    progress_keys: ClassVar[tuple[str, ...]] = ()
    #: defaults of shared keys whose default is this objective's own (the config's null means "the objective's")
    key_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def validate(cls, cfg: Any) -> None:
        """Check this objective's keys; raise ``ConfigError`` with a one-line message."""

    @abstractmethod
    def rollout(
        self, field_fn: VelocityField, noise: torch.Tensor, sigmas: torch.Tensor, solver: str,
        indices: torch.Tensor, round_idx: int,
    ) -> RolloutRecord:  # fmt: skip
        """Generate x1 [n, *shape] from ``noise`` with the sampler's field, recording what training needs."""

    @abstractmethod
    def signal(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> Signal:
        """rewards: [B] of the global batch; group_ids: [B] the prompt of each sample."""

    @abstractmethod
    def losses(self, batch: MicroBatch, fields: Fields) -> Iterator[StepLoss]:
        """The losses of one micro-batch, each to back-propagate as it comes (gradients accumulate)."""

    def needs_reference(self) -> bool:
        """Whether ``losses`` calls the reference field (a second forward)."""
        return True

    def needs_sampler(self) -> bool:
        """Whether ``losses`` calls the sampler's field (``Fields.sampler``, a no-grad forward)."""
        return False

    def follow(self, policy: "Policy", module: torch.nn.Module, round_idx: int, optimizer_steps: int) -> dict[str, Any]:
        """Let the sampler follow the trained policy after round ``round_idx`` (``optimizer_steps`` done so far).

        The default: a hard refresh (the sampler becomes a copy) every ``sampler_update_interval`` rounds.
        Returns the round's sampler metrics.
        """
        refreshed = (round_idx + 1) % self.cfg.sampler_update_interval == 0
        if refreshed:
            policy.refresh(module)
        return {"sampler_refreshed": refreshed}

    def round_latents(self) -> tuple[int, int]:
        """Latent-sized tensors a rollout keeps per sample on the training device, (in the weight dtype, in
        float32): the memory planner's round data. x1 alone by default."""
        return 1, 0

    @classmethod
    def card_rows(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The model card's rows for this objective's settings, from a run's ``config.yaml`` (its keys by default)."""
        return [(cls.card_labels.get(k, f"`{k}`"), _card_value(config.get(k))) for k in cls.card_keys or cls.config_keys]

    # --- state that changes from round to round (e.g. an adaptive coefficient) -------------------------
    def end_round(self, metrics: dict[str, float]) -> dict[str, float]:
        """After a round's optimisation: ``metrics`` are its logged scalars (reduced over processes, so every
        process sees the same). Update any adaptive state; return extra metrics to log for this round."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that ``end_round`` changes; checkpointed, so a resumed run continues bitwise."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output (an empty dict: a checkpoint written without state)."""


def _card_value(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def slice_extras(extras: dict[str, torch.Tensor], rows: torch.Tensor, device: Optional[torch.device] = None) -> dict:
    return {k: (v[rows] if device is None else v[rows].to(device)) for k, v in extras.items()}
