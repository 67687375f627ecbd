"""The LoRA policy: two adapters on the one denoiser, the reference is the adapters disabled (no copy).

- ``default`` is trained; ``sampler`` generates the rollouts and is refreshed from ``default``.
- Checkpoints and the final weights are the model's LoRA files (``model.save_lora_weights``: diffusers
  format for a pipeline, a safetensors file with peft's key names for a plain velocity model).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .. import lora
from ..checkpoint import SAMPLER_SUBDIR
from ..errors import ConfigError
from ..keys import check_positive, key_field
from ..models.base import FlowModel
from .base import Policy


@dataclass
class LoRAKeys:
    """The run-config keys of the LoRA policy."""

    rank: int = key_field("LoRA rank (policy lora).", 32)
    lora_alpha: Optional[float] = key_field("LoRA alpha (scale = lora_alpha / rank). Default: equal to rank.", None)
    lora_target_modules: Optional[list[str]] = key_field(
        "Module names to adapt (diffusers' lora_layers: one comma-separated string). Default: the family's "
        "attention projections.",
        None,
    )
    lora_dropout: float = key_field("Dropout probability of the trained LoRA layers (peft's lora_dropout).", 0.0)


def validate_lora_keys(cfg: Any) -> None:
    check_positive(cfg, "rank")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha: {cfg.lora_alpha!r} must be > 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout: {cfg.lora_dropout!r} must be in [0, 1)")


class LoRAPolicy(Policy):
    def __init__(self, rank: int, lora_alpha: Optional[float], target_modules: list[str], dropout: float = 0.0):
        self.rank = rank
        self.lora_alpha = lora_alpha
        self.target_modules = target_modules
        self.dropout = dropout

    def attach(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        return lora.add_adapters(module, self.rank, self.lora_alpha, self.target_modules, self.dropout)

    @contextlib.contextmanager
    def sampler(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        # in eval mode, so that lora_dropout never touches the sampler (also when a loss asks for its velocity)
        was_training = module.training
        module.eval()
        try:
            with lora.sampler_adapter(module):
                yield module
        finally:
            module.train(was_training)

    @contextlib.contextmanager
    def reference(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with lora.reference(module):
            yield module

    def refresh(self, module: torch.nn.Module) -> None:
        lora.copy_adapter(module, lora.TRAINED, lora.SAMPLER)

    def soft_update(self, module: torch.nn.Module, eta: float) -> None:
        lora.blend_adapter(module, eta, lora.TRAINED, lora.SAMPLER)

    def _save_adapter(self, directory: str, model: FlowModel, module: torch.nn.Module, adapter: str) -> None:
        model.save_lora_weights(directory, lora.export_adapter(module, adapter), lora.adapter_metadata(module, adapter))

    def save_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        # The trained adapter at the top, the sampler in sampler/ (a pipeline's: both loadable by pipe.load_lora_weights).
        self._save_adapter(directory, model, module, lora.TRAINED)
        self._save_adapter(os.path.join(directory, SAMPLER_SUBDIR), model, module, lora.SAMPLER)

    def load_checkpoint(self, directory: str, model: FlowModel, module: torch.nn.Module) -> None:
        for adapter, source in ((lora.TRAINED, directory), (lora.SAMPLER, os.path.join(directory, SAMPLER_SUBDIR))):
            lora.load_adapter_state_dict(module, model.read_lora_weights(source), adapter)

    def save(self, output_dir: str, model: FlowModel, module: torch.nn.Module) -> str:
        self._save_adapter(output_dir, model, module, lora.TRAINED)
        return model.lora_usage(output_dir)

    def export_weights(self, module: torch.nn.Module, sampler: bool = False) -> dict[str, torch.Tensor]:
        return lora.merged_state_dict(module, lora.SAMPLER if sampler else lora.TRAINED)

    def describe(self, cfg: Any) -> str:
        return f"LoRA rank {self.rank} on {', '.join(self.target_modules)}; reference = adapters disabled"
