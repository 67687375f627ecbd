"""The LoRA policy: two adapters on the one denoiser, the reference is the adapters disabled (no copy).

- ``default`` is trained; ``sampler`` generates the rollouts and is refreshed from ``default``.
- Checkpoints and the final weights are diffusers-format LoRA files (``model.save_lora_weights``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch

from .. import lora
from ..checkpoint import LORA_WEIGHTS_NAME, SAMPLER_SUBDIR, read_lora_file
from ..models.base import FlowModel
from .base import Policy


class LoRAPolicy(Policy):
    def __init__(self, rank: int, lora_alpha: Optional[float], target_modules: list[str]):
        self.rank = rank
        self.lora_alpha = lora_alpha
        self.target_modules = target_modules

    def attach(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        return lora.add_adapters(module, self.rank, self.lora_alpha, self.target_modules)

    @contextlib.contextmanager
    def sampler(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with lora.sampler_adapter(module):
            yield module

    @contextlib.contextmanager
    def reference(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with lora.reference(module):
            yield module

    def refresh(self, module: torch.nn.Module) -> None:
        lora.copy_adapter(module, lora.TRAINED, lora.SAMPLER)

    def _save_adapter(self, directory: str, model: FlowModel, module: torch.nn.Module, adapter: str) -> None:
        model.save_lora_weights(directory, lora.export_adapter(module, adapter), lora.adapter_metadata(module, adapter))

    def save_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        # The trained adapter at the top, the sampler in sampler/: both loadable by pipe.load_lora_weights.
        self._save_adapter(directory, model, module, lora.TRAINED)
        self._save_adapter(os.path.join(directory, SAMPLER_SUBDIR), model, module, lora.SAMPLER)

    def load_checkpoint(self, directory: str, module: torch.nn.Module) -> None:
        for adapter, source in ((lora.TRAINED, directory), (lora.SAMPLER, os.path.join(directory, SAMPLER_SUBDIR))):
            lora.load_adapter_state_dict(module, read_lora_file(os.path.join(source, LORA_WEIGHTS_NAME)), adapter)

    def save(self, output_dir: str, model: FlowModel, module: torch.nn.Module) -> str:
        self._save_adapter(output_dir, model, module, lora.TRAINED)
        path = os.path.join(output_dir, LORA_WEIGHTS_NAME)
        return f"LoRA weights: {path} (load with pipe.load_lora_weights({output_dir!r}))"

    def describe(self, cfg: Any) -> str:
        return f"LoRA rank {self.rank} on {', '.join(self.target_modules)}; reference = adapters disabled"
