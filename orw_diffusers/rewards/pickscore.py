"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, via transformers.

Score = ``logit_scale.exp() * cos(image, prompt)`` as in the PickScore README (about 15..25 for
typical SD images). Images are preprocessed in torch on the reward device with the processor's
own size / crop / mean / std; only the tokenizer of the processor is run as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from ..dtypes import named_dtype
from .common import chunks, freeze, load_once, preprocess_images

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes used by image processors


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class HFClipBundle:
    """A frozen ``transformers.CLIPModel``, its processor and a text-embedding cache."""

    model: torch.nn.Module
    processor: Any
    device: torch.device
    dtype: torch.dtype
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> [D] float32, unit norm

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> normalised pixels as the image processor would make them."""
        ip = self.processor.image_processor
        size, crop = ip.size, ip.crop_size if getattr(ip, "do_center_crop", True) else None
        if size.get("shortest_edge"):
            resize_to, mode = int(size["shortest_edge"]), "shortest"
            crop_size = (crop["height"], crop["width"]) if crop else None
        else:
            resize_to, mode, crop_size = (int(size["height"]), int(size["width"])), "squash", None
        return preprocess_images(
            images,
            resize_to,
            ip.image_mean,
            ip.image_std,
            resize_mode=mode,
            interpolation=_RESAMPLE.get(int(getattr(ip, "resample", 3)), "bicubic"),
            crop_size=crop_size,
        )

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """images: float [B, 3, H, W] in [0, 1] -> unit-norm embeddings float32 [B, D] on ``device``."""
        out = []
        for part in chunks(images.shape[0], batch_size):
            pixels = self.pixel_values(images[part].to(self.device)).to(self.dtype)
            emb = _features(self.model.get_image_features(pixel_values=pixels)).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """prompts (N) -> unit-norm embeddings float32 [N, D]; each unique prompt is encoded once."""
        tokenizer = self.processor.tokenizer
        max_length = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        for part in chunks(len(missing), batch_size):
            tokens = tokenizer(missing[part], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            emb = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            ).float()
            for prompt, e in zip(missing[part], torch.nn.functional.normalize(emb, dim=-1)):
                self.text_cache[prompt] = e
        return torch.stack([self.text_cache[p] for p in prompts])


def _source_key(name_or_path: str) -> str:
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def load_hf_clip(
    model: str, processor: str, device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype] = torch.float32
) -> HFClipBundle:
    """``CLIPModel`` + ``AutoProcessor`` from hub ids or local directories; loaded once per process
    for each (model, processor, device, dtype)."""
    device, dtype = torch.device(device), named_dtype(dtype)

    def load() -> HFClipBundle:
        from transformers import AutoProcessor, CLIPModel

        clip_model = CLIPModel.from_pretrained(model, dtype=dtype).to(device)
        return HFClipBundle(freeze(clip_model), AutoProcessor.from_pretrained(processor), device, dtype)

    return load_once(("hf_clip", _source_key(model), _source_key(processor), str(device), dtype), load)


class PickScore:
    """``logit_scale * cos(image, prompt)``: float32 [B] on CPU."""

    def __init__(self, bundle: HFClipBundle, batch_size: int):
        self.bundle, self.batch_size = bundle, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        image_emb = self.bundle.image_features(images, self.batch_size)  # [B, D]
        text_emb = self.bundle.text_features(prompts)  # [B, D]
        return (self.bundle.logit_scale * (image_emb * text_emb).sum(-1)).cpu()


def pickscore(
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    batch_size: int = 32,
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
) -> PickScore:
    """PickScore; ``model`` and ``processor`` are hub ids or local ``save_pretrained`` directories."""
    return PickScore(load_hf_clip(model, processor, device, dtype), batch_size)
