"""The model-family interface: everything the sampler and trainer need from a flow-matching pipeline.

A family (SD3, FLUX, ...) is one subclass of ``FlowFamily`` in its own file. The trainer and the
sampler only talk to this interface and never ask which family they have.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

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


@dataclass(frozen=True)
class LoadOptions:
    """What a family needs to load a checkpoint (a subset of the run config)."""

    pretrained_model_name_or_path: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    load_t5: bool = True
    max_sequence_length: int = 256


class FlowFamily(ABC):
    """One loaded pipeline of a family. Holds the frozen parts; the transformer carries the adapters."""

    #: diffusers pipeline class names (``model_index.json``'s ``_class_name``) this family loads
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: default LoRA target modules of the transformer
    lora_target_modules: ClassVar[list[str]] = []
    #: weight dtypes this family supports (e.g. FLUX: no fp16)
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    #: why a dtype outside ``supported_dtypes`` is refused: one clause for the one-line config error
    precision_note: ClassVar[str] = ""
    #: text encoders ``encode_prompts`` needs: fewer held means they were released
    required_text_encoders: ClassVar[int] = 1

    def __init__(self, pipeline: Any, options: LoadOptions):
        self.pipeline = pipeline
        self.options = options
        self.text_encoder_calls = 0  # forward passes of the text encoders, for the prompt-cache benchmark

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, options: LoadOptions, weight_dtype: torch.dtype, model_index: dict) -> "FlowFamily":
        """Load the pipeline on CPU in ``weight_dtype``; ``model_index`` is its ``model_index.json``."""

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @abstractmethod
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders still held (empty once released)."""

    @abstractmethod
    def release_text_encoders(self) -> None:
        """Drop the text encoders: after the prompt cache is filled they are never needed again."""

    # --- guidance -------------------------------------------------------------------------------
    def configure_guidance(self, guidance_scale: float) -> float:
        """Take the run's ``guidance_scale``; return the true-CFG scale the sampler should apply.

        Called once after loading. The default is classifier-free guidance (SD3): the scale passes
        through. A guidance-distilled family (FLUX.1-dev) instead feeds the value to its guidance
        embedding in every ``predict_velocity`` (sampling and training alike) and returns 1, so the
        sampler runs no unconditional pass.
        """
        return guidance_scale

    # --- the arrows of the data flow ----------------------------------------------------------
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """Text -> conditioning ``[len(prompts), ...]`` (no cache here; see ``PromptCache``).

        Moves the text encoders to ``device``, runs the family's ``_encode_prompts`` and counts the
        prompts encoded in ``text_encoder_calls``.
        """
        encoders = self.text_encoders()
        if len(encoders) < self.required_text_encoders:
            raise RuntimeError("the text encoders were released; every prompt must be encoded before that")
        for te in encoders:
            te.to(device)
        cond = self._encode_prompts(prompts, device)
        self.text_encoder_calls += len(prompts)
        return cond

    @abstractmethod
    def _encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The pipeline's own prompt encoding, with the text encoders already on ``device``."""

    @abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one sample's latent (without the batch dim) at ``resolution`` pixels."""

    @abstractmethod
    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Decreasing sigmas ``[num_steps + 1]`` from ~1 to 0, as the pipeline's scheduler sets them."""

    @abstractmethod
    def predict_velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """v(x_sigma, sigma, c). latents: [B, *latent_shape]; sigmas: [B]; returns [B, *latent_shape].

        ``model`` is the transformer (possibly wrapped by DDP); the family knows its call convention.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images float32 [B, 3, H, W] in [0, 1]."""

    # --- LoRA I/O -------------------------------------------------------------------------------
    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write ``pytorch_lora_weights.safetensors`` in diffusers format via the pipeline class."""
        type(self.pipeline).save_lora_weights(
            save_directory, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata
        )


class PromptCache:
    """Prompt embeddings computed once per unique prompt and kept on CPU in the weight dtype.

    Filled up front with every training prompt and the negative prompt; afterwards the family's
    text encoders are released, which is what lets SD3.5 with T5 fit a 24 GB card.
    """

    def __init__(self, family: FlowFamily, prompts: Sequence[str], device: torch.device, batch_size: int = 8):
        unique = list(dict.fromkeys(prompts))
        self.index = {p: i for i, p in enumerate(unique)}
        parts = []
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                parts.append(family.encode_prompts(unique[start : start + batch_size], device).to("cpu"))
        self.embeddings = Conditioning.cat(parts)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        """Conditioning ``[len(prompts), ...]`` on ``device``; a prompt not in the cache is an error."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise KeyError(f"prompt not in the prompt cache: {missing[0]!r}")
        return self.embeddings.select([self.index[p] for p in prompts]).to(device)


def read_model_index(path_or_id: str, revision: Optional[str] = None) -> dict:
    """``model_index.json`` of a local directory or a hub repo."""
    if os.path.isdir(path_or_id):
        file = os.path.join(path_or_id, "model_index.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path_or_id!r} has no model_index.json: not a diffusers pipeline directory")
    else:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path_or_id, "model_index.json", revision=revision)
    with open(file) as f:
        return json.load(f)
