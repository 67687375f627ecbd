"""Diffusers pipelines behind the model seam: text encoders, the prompt cache, diffusers-format LoRA files.

A pipeline family (SD3, FLUX, ...) is one subclass of ``PipelineFamily`` in its own file.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from ..weight_files import LORA_WEIGHTS_NAME
from ..keys import key_field
from .base import Conditioning, FlowModel


@dataclass
class PipelineKeys:
    """The run-config keys of a diffusers pipeline (the fields of ``LoadOptions``)."""

    pretrained_model_name_or_path: str = key_field(
        "Hub id or local directory of a diffusers flow-matching pipeline (StableDiffusion3Pipeline, FluxPipeline), "
        "or 'orw-diffusers/digits': the CPU digits base of the demo, read from the cache ($ORW_DIFFUSERS_CACHE, "
        "default ~/.cache/orw_diffusers) and built there (minutes, on CPU) when first loaded.",
        "stabilityai/stable-diffusion-3.5-medium",
        path=True,
    )
    revision: Optional[str] = key_field("Hub revision (branch, tag or commit) of the model.", None)
    variant: Optional[str] = key_field("Weight file variant to load, e.g. 'fp16'.", None)
    load_t5: bool = key_field("Load the T5 text encoder (SD3). False saves ~9 GB; T5 context is then zeros.", True)
    max_sequence_length: int = key_field("T5 token length of the prompt context (diffusers' default 256).", 256)


@dataclass(frozen=True)
class LoadOptions:
    """What a family needs to load a checkpoint (a subset of the run config)."""

    pretrained_model_name_or_path: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    load_t5: bool = True
    max_sequence_length: int = 256


class PipelineFamily(FlowModel):
    """One loaded diffusers pipeline of a family. Holds the frozen parts; the transformer is the denoiser."""

    #: diffusers pipeline class names (``model_index.json``'s ``_class_name``) this family loads
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: text encoders ``encode_prompts`` needs: fewer held means they were released
    required_text_encoders: ClassVar[int] = 1

    def __init__(self, pipeline: Any, options: LoadOptions):
        self.pipeline = pipeline
        self.options = options
        self.text_encoder_calls = 0  # prompts through the text encoders (the prompt-cache tests count them)
        self.prompt_cache: Optional[PromptCache] = None  # filled by ``prepare``
        self.negative_prompt = ""

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, options: LoadOptions, weight_dtype: torch.dtype, model_index: dict) -> "PipelineFamily":
        """Load the pipeline on CPU in ``weight_dtype``; ``model_index`` is its ``model_index.json``."""

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.transformer

    def prepare(self, prompts: Sequence[str], negative_prompt: str, device: torch.device) -> None:
        """Encode every prompt once (on CPU in the weight dtype), drop the text encoders, then move the
        VAE and the transformer to ``device``: the order that lets SD3.5 with T5 fit a 24 GB card."""
        from diffusers.training_utils import free_memory

        self.negative_prompt = negative_prompt
        self.prompt_cache = PromptCache(self, [*prompts, negative_prompt], device)
        self.release_text_encoders()
        free_memory()
        self.vae.to(device).requires_grad_(False).eval()
        self.transformer.to(device)

    def conditioning(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        if self.prompt_cache is None:
            raise RuntimeError("prepare() must encode the prompts before conditioning() is called")
        return self.prompt_cache.get(prompts, device)

    def negative_conditioning(self, n: int, device: torch.device) -> Conditioning:
        return self.conditioning([self.negative_prompt] * n, device)

    @abstractmethod
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders still held (empty once released)."""

    @abstractmethod
    def release_text_encoders(self) -> None:
        """Drop the text encoders: after the prompt cache is filled they are never needed again."""

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

    # --- LoRA I/O -------------------------------------------------------------------------------
    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write ``pytorch_lora_weights.safetensors`` in diffusers format via the pipeline class."""
        type(self.pipeline).save_lora_weights(
            save_directory, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata
        )

    def read_lora_weights(self, directory: str) -> dict[str, torch.Tensor]:
        from ..checkpoint import read_lora_file

        return read_lora_file(os.path.join(directory, LORA_WEIGHTS_NAME))

    def lora_usage(self, directory: str) -> str:
        path = os.path.join(directory, LORA_WEIGHTS_NAME)
        return f"LoRA weights: {path} (load with pipe.load_lora_weights({directory!r}))"


class PromptCache:
    """Prompt embeddings computed once per unique prompt and kept on CPU in the weight dtype.

    Filled up front with every training prompt and the negative prompt; afterwards the family's
    text encoders are released, which is what lets SD3.5 with T5 fit a 24 GB card.
    """

    def __init__(self, family: PipelineFamily, prompts: Sequence[str], device: torch.device, batch_size: int = 8):
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
    """``model_index.json`` of a local directory or a hub repo, read by ``DiffusionPipeline.load_config``
    (the Hub cache, ``HF_HUB_OFFLINE`` and ``revision`` as diffusers handles them)."""
    if os.path.isdir(path_or_id) and not os.path.isfile(os.path.join(path_or_id, "model_index.json")):
        raise FileNotFoundError(f"{path_or_id!r} has no model_index.json: not a diffusers pipeline directory")
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path_or_id, revision=revision))


def load_diffusers_pipeline(
    path_or_id: str, pipeline_class: Any = None, *, load_t5: bool = True, model_index: Optional[dict] = None,
    revision: Optional[str] = None, **kwargs: Any,
) -> Any:
    """``pipeline_class.from_pretrained`` (default ``DiffusionPipeline``), passing None for every component
    that ``model_index.json`` saves as null: a pipeline saved without one (SD3 without T5) only reloads that way.

    ``load_t5=False`` also leaves out SD3's T5 (``text_encoder_3``, ``tokenizer_3``). ``model_index``: the
    index when it is already read. ``kwargs`` go to ``from_pretrained`` (``dtype``, ``variant``, ...).
    """
    from diffusers import DiffusionPipeline

    index = read_model_index(path_or_id, revision) if model_index is None else model_index
    nulls = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
    if not load_t5:
        nulls.update(text_encoder_3=None, tokenizer_3=None)
    return (pipeline_class or DiffusionPipeline).from_pretrained(path_or_id, revision=revision, **nulls, **kwargs)
