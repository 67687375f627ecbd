"""The policy seam: how the trained parameters, the sampler and the reference are held.

The round loop asks a policy for the parameters to optimise, for the module to sample with and the
module to take the reference velocity from, to refresh the sampler, and to save and restore its
weights. It never names a policy.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch

from ..models.base import FlowModel


class Policy(ABC):
    """``module`` below is always the unwrapped denoiser being trained (not a DDP wrapper)."""

    @abstractmethod
    def attach(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Make ``module`` trainable the policy's way; return the parameters to optimise."""

    @abstractmethod
    @contextlib.contextmanager
    def sampler(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module that generates the rollouts, under no grad."""

    @abstractmethod
    @contextlib.contextmanager
    def reference(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module of the reference velocity (the base model), under no grad."""

    @abstractmethod
    def refresh(self, module: torch.nn.Module) -> None:
        """Copy the trained weights into the sampler."""

    @abstractmethod
    def soft_update(self, module: torch.nn.Module, eta: float) -> None:
        """Move the sampler towards the trained weights: ``sampler <- eta * sampler + (1 - eta) * trained``.

        eta = 0 is ``refresh``; eta = 1 keeps the sampler as it is.
        """

    @abstractmethod
    def save_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        """Write the trained and the sampler weights into a checkpoint directory (main process)."""

    @abstractmethod
    def load_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        """Restore what ``save_checkpoint`` wrote, in place (the optimizer keeps its parameters)."""

    @abstractmethod
    def save(self, output_dir: str, model: FlowModel, module: torch.nn.Module) -> str:
        """Write the trained weights for use after training; return a one-line note of where and how to load."""

    @abstractmethod
    def export_weights(self, module: torch.nn.Module, sampler: bool = False) -> dict[str, torch.Tensor]:
        """The trained (or the sampler's) weights as a state dict of the model without adapters (CPU)."""

    def describe(self, cfg: Any) -> str:
        """One line for the start-up log."""
        return type(self).__name__
