"""The model seam: what the round loop and the sampler need from a flow-matching model.

``FlowModel`` assumes no pipeline: a latent (or pixel) shape, the sampling sigmas, the velocity at
``(x, sigma, cond)``, a decode to images in [0, 1], and optional conditioning. Diffusers pipelines
(SD3, FLUX) add text encoders, the prompt cache and diffusers-format LoRA files in ``pipeline.py``.
The trainer and the sampler only talk to this interface and never ask which model they have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch


@dataclass
class Conditioning:
    """Prompt embeddings of one family, batched on dim 0 (e.g. SD3: ``prompt_embeds``, ``pooled``)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "Conditioning":
        index = torch.as_tensor(index, dtype=torch.long)
        return Conditioning({k: v.index_select(0, index.to(v.device)) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        return Conditioning({k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


class FlowModel(ABC):
    """A loaded flow-matching model. Convention: sigma = 1 is noise, sigma = 0 is data."""

    #: default LoRA target modules of the denoiser
    lora_target_modules: ClassVar[list[str]] = []
    #: weight dtypes this model supports (e.g. FLUX: no fp16)
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    #: why a dtype outside ``supported_dtypes`` is refused: one clause for the one-line config error
    precision_note: ClassVar[str] = ""
    #: the policy (``policies.POLICIES``) of a run that leaves ``policy`` unset
    default_policy: ClassVar[str] = "lora"

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module that predicts the velocity; the policy trains it (adapters or all its weights)."""

    def configure_guidance(self, guidance_scale: float) -> float:
        """Take the run's ``guidance_scale``; return the true-CFG scale the sampler should apply.

        Called once after loading. The default is classifier-free guidance (SD3): the scale passes
        through. A guidance-distilled model (FLUX.1-dev) instead feeds the value to its guidance
        embedding in every ``predict_velocity`` (sampling and training alike) and returns 1, so the
        sampler runs no unconditional pass.
        """
        return guidance_scale

    def prepare(self, prompts: Sequence[str], negative_prompt: str, device: torch.device) -> None:
        """Get ready to train on ``device`` with these prompts (every one the run will condition on).

        The default moves the denoiser. A pipeline also encodes every prompt once and frees its
        text encoders.
        """
        self.denoiser.to(device)

    def conditioning(self, prompts: Sequence[str], device: torch.device) -> Optional[Conditioning]:
        """The conditioning of ``prompts`` ``[len(prompts), ...]`` on ``device``; None: unconditional."""
        return None

    def negative_conditioning(self, n: int, device: torch.device) -> Optional[Conditioning]:
        """The unconditional branch of classifier-free guidance for ``n`` samples; None without CFG."""
        return None

    @abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one sample's latent (without the batch dim) at ``resolution`` pixels."""

    @abstractmethod
    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Decreasing sigmas ``[num_steps + 1]`` from ~1 to 0, as the model's scheduler sets them."""

    @abstractmethod
    def predict_velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Optional[Conditioning]
    ) -> torch.Tensor:
        """v(x_sigma, sigma, c). latents: [B, *latent_shape]; sigmas: [B]; returns [B, *latent_shape].

        ``model`` is the denoiser or a copy of it (possibly wrapped by DDP); the model knows its call convention.
        """

    def finish_rollout(self, latents: torch.Tensor) -> torch.Tensor:
        """A rollout's final sample [B, *latent_shape] as it is scored and trained on (pipelines: unchanged)."""
        return latents

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images float32 [B, 3, H, W] in [0, 1]."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in backward (``gradient_checkpointing: true``)."""
        self.denoiser.enable_gradient_checkpointing()

    # --- LoRA files -----------------------------------------------------------------------------
    @abstractmethod
    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write one adapter (peft's adapter-free key names, its LoRA config) into ``save_directory``."""

    @abstractmethod
    def read_lora_weights(self, directory: str) -> dict[str, torch.Tensor]:
        """What ``save_lora_weights`` wrote into ``directory``, with peft's adapter-free key names."""

    def lora_usage(self, directory: str) -> str:
        """One line: where ``save_lora_weights`` put the adapter of ``directory`` and how to load it."""
        return f"LoRA weights in {directory}"

    def weights_metadata(self) -> dict[str, str]:
        """What the saved weights' safetensors metadata says about the model (the model card reads it);
        {} for a pipeline's denoiser."""
        return {}
