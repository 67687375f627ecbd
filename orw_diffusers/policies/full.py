"""Full fine-tuning, the paper's way: every weight of the denoiser is trained; the reference is a
frozen copy of the base, and the sampler a second copy refreshed from the trained weights.

Three copies of the model (as in the authors' code: net, last policy, reference), so this is for
small models such as a torchcfm UNet; the trained weights are fp32. Checkpoints and the final weights
are safetensors state dicts of the denoiser (``model.safetensors``), loadable with ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

import torch

from ..checkpoint import SAMPLER_SUBDIR
from ..models.base import FlowModel
from ..weight_files import FULL_WEIGHTS_NAME
from .base import Policy


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict on CPU, every tensor its own contiguous copy (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_state_dict(module: torch.nn.Module, directory: str, metadata: dict[str, str] | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FULL_WEIGHTS_NAME)
    save_file(cpu_state_dict(module), path, metadata=metadata or None)
    return path


def load_state_dict(module: torch.nn.Module, directory: str) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(os.path.join(directory, FULL_WEIGHTS_NAME)))


class FullPolicy(Policy):
    def __init__(self) -> None:
        self.reference_module: torch.nn.Module | None = None
        self.sampler_module: torch.nn.Module | None = None

    def attach(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        module.to(torch.float32).requires_grad_(True)
        # Copies of the base before any step: the reference stays, the sampler follows the refreshes.
        self.reference_module = copy.deepcopy(module).requires_grad_(False).eval()
        self.sampler_module = copy.deepcopy(module).requires_grad_(False).eval()
        return list(module.parameters())

    def _copies(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        if self.reference_module is None or self.sampler_module is None:
            raise RuntimeError("FullPolicy: attach() must run first")
        return self.reference_module, self.sampler_module

    @contextlib.contextmanager
    def sampler(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield self._copies()[1]

    @contextlib.contextmanager
    def reference(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield self._copies()[0]

    @torch.no_grad()
    def refresh(self, module: torch.nn.Module) -> None:
        self._copies()[1].load_state_dict(module.state_dict())

    @torch.no_grad()
    def soft_update(self, module: torch.nn.Module, eta: float) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"soft_update: eta {eta!r} must be in [0, 1]")
        trained = module.state_dict()
        for key, old in self._copies()[1].state_dict().items():
            new = trained[key].to(old.dtype)
            # torch.lerp is exact at both ends: eta 0 copies, eta 1 keeps; buffers that are not floats are copied
            old.copy_(torch.lerp(new, old, eta) if old.is_floating_point() else new)

    def save_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        save_state_dict(module, directory)
        save_state_dict(self._copies()[1], os.path.join(directory, SAMPLER_SUBDIR))

    def load_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        load_state_dict(module, directory)
        load_state_dict(self._copies()[1], os.path.join(directory, SAMPLER_SUBDIR))

    def save(self, output_dir: str, model: FlowModel, module: torch.nn.Module) -> str:
        path = save_state_dict(module, output_dir, model.weights_metadata())
        return f"fine-tuned weights: {path} (module.load_state_dict(safetensors.torch.load_file({path!r})))"

    def export_weights(self, module: torch.nn.Module, sampler: bool = False) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self._copies()[1] if sampler else module)

    def describe(self, cfg: Any) -> str:
        return "full fine-tuning; reference = a frozen copy of the base, sampler = a copy refreshed from the trained weights"
