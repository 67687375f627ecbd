"""open_clip rewards: ``clip_score``, ``clip_zero_shot`` (the ORW-CFM-W2 authors' reward) and ``hpsv2``.

All three go through :func:`load_open_clip`, so rewards that name the same model, weights,
device and dtype share one loaded copy and one text-embedding cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..dtypes import named_dtype
from .common import chunks, freeze, hub_or_local_file, load_once, preprocess_images

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class OpenClipBundle:
    """A frozen open_clip model, its tokenizer and preprocessing, and a text-embedding cache."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess_cfg: dict[str, Any]  # open_clip's: size, mean, std, interpolation, resize_mode, fill_color
    device: torch.device
    dtype: torch.dtype
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> [D] float32, unit norm

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int, resize_mode: Optional[str] = None) -> torch.Tensor:
        """images: float [B, 3, H, W] in [0, 1] -> unit-norm embeddings float32 [B, D] on ``device``."""
        cfg = self.preprocess_cfg
        interpolation = cfg.get("interpolation", "bicubic")
        interpolation = "bicubic" if interpolation == "random" else interpolation
        out = []
        for part in chunks(images.shape[0], batch_size):
            pixels = preprocess_images(
                images[part].to(self.device),
                cfg["size"],
                cfg["mean"],
                cfg["std"],
                resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
                interpolation=interpolation,
                fill=cfg.get("fill_color", 0) / 255.0,
            )
            out.append(self.model.encode_image(pixels.to(self.dtype), normalize=True).float())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """prompts (N) -> unit-norm embeddings float32 [N, D]; each unique prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        for part in chunks(len(missing), batch_size):
            tokens = self.tokenizer(missing[part]).to(self.device)
            for prompt, emb in zip(missing[part], self.model.encode_text(tokens, normalize=True).float()):
                self.text_cache[prompt] = emb
        return torch.stack([self.text_cache[p] for p in prompts])


def _weights_key(pretrained: Optional[str]) -> Optional[str]:
    return os.path.abspath(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained


def load_open_clip(
    model: str,
    pretrained: Optional[str],
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
) -> OpenClipBundle:
    """An open_clip model by name (a built-in, or one registered with ``open_clip.add_model_config``)
    with ``pretrained`` = a tag (downloaded by open_clip) or a local checkpoint file; loaded once
    per process for each (model, pretrained, device, dtype)."""
    device, dtype = torch.device(device), named_dtype(dtype)

    def load() -> OpenClipBundle:
        import open_clip

        clip_model = open_clip.create_model(model, pretrained=pretrained, precision=_PRECISION[dtype], device=device)
        preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(clip_model))  # public since open_clip 2.24
        return OpenClipBundle(freeze(clip_model), open_clip.get_tokenizer(model), preprocess_cfg, device, dtype)

    return load_once(("open_clip", model, _weights_key(pretrained), str(device), dtype), load)


class ClipScore:
    """``scale * cos(image embedding, prompt embedding)``: float32 [B] on CPU."""

    def __init__(self, bundle: OpenClipBundle, scale: float, batch_size: int, resize_mode: Optional[str] = None):
        self.bundle, self.scale, self.batch_size, self.resize_mode = bundle, float(scale), batch_size, resize_mode

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        image_emb = self.bundle.image_features(images, self.batch_size, self.resize_mode)  # [B, D]
        text_emb = self.bundle.text_features(prompts)  # [B, D]
        return (self.scale * (image_emb * text_emb).sum(-1)).cpu()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings float32 [B, D] on CPU: the space of the trainer's diversity metric."""
        return self.bundle.image_features(images, self.batch_size, self.resize_mode).float().cpu()


def clip_score(
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    batch_size: int = 32,
    model: str = "ViT-H-14",
    pretrained: Optional[str] = "laion2b_s32b_b79k",
    scale: float = 100.0,
) -> ClipScore:
    """CLIPScore: ``scale`` x the cosine similarity of image and prompt (range [-scale, scale];
    not clipped at 0, unlike the metric, so low scores still rank)."""
    return ClipScore(load_open_clip(model, pretrained, device, dtype), scale, batch_size)


class ClipZeroShot:
    """P(positive prompts) - P(negative prompts) under CLIP's softmax over all of them: float32 [B] in [-1, 1]."""

    def __init__(self, bundle: OpenClipBundle, positive: list[str], negative: list[str], batch_size: int):
        self.bundle, self.batch_size = bundle, batch_size
        self.num_positive = len(positive)
        self.text_emb = bundle.text_features(positive + negative)  # [P + N, D]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_emb = self.bundle.image_features(images, self.batch_size)  # [B, D]
        probs = (self.bundle.logit_scale * image_emb @ self.text_emb.T).softmax(dim=-1)  # [B, P + N]
        return (probs[:, : self.num_positive].sum(-1) - probs[:, self.num_positive :].sum(-1)).cpu()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings float32 [B, D] on CPU."""
        return self.bundle.image_features(images, self.batch_size).float().cpu()


def _prompt_list(value: Union[str, Sequence[str]], name: str) -> list[str]:
    prompts = [value] if isinstance(value, str) else list(value or [])
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"clip_zero_shot: '{name}' must be a non-empty list of prompts, got {value!r}")
    return prompts


def clip_zero_shot(
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    batch_size: int = 32,
    positive: Union[str, Sequence[str]] = ("An image of dog",),
    negative: Union[str, Sequence[str]] = ("Not an image of dog",),
    model: str = "ViT-H-14",
    pretrained: Optional[str] = "laion2b_s32b_b79k",
) -> ClipZeroShot:
    """The ORW-CFM-W2 repository's CLIP reward (``prob[:, 0] - prob[:, 1]`` over its two prompts),
    generalised to lists. Ignores the per-image prompts. Defaults are the authors' example prompts."""
    positive, negative = _prompt_list(positive, "positive"), _prompt_list(negative, "negative")
    return ClipZeroShot(load_open_clip(model, pretrained, device, dtype), positive, negative, batch_size)


def hpsv2(
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    batch_size: int = 32,
    weights: Optional[str] = None,
    weights_repo: str = "xswu/HPSv2",
    weights_filename: str = "HPS_v2.1_compressed.pt",
    model: str = "ViT-H-14",
) -> ClipScore:
    """Human Preference Score v2: the cosine of an HPS-fine-tuned open_clip ViT-H-14, with HPSv2's
    letterbox preprocessing (longest edge to 224, zero padding). ``weights``: a local checkpoint
    (``{'state_dict': ...}``), else ``weights_repo/weights_filename`` from the Hub
    (``HPS_v2_compressed.pt`` for v2.0)."""
    checkpoint = hub_or_local_file(weights, weights_repo, weights_filename)
    return ClipScore(load_open_clip(model, checkpoint, device, dtype), 1.0, batch_size, resize_mode="longest")
