"""Shared pieces of the model-based rewards: the per-process model cache, torch image
preprocessing, chunking and weight-file loading.

Nothing here imports a heavy optional dependency at module import time.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F


class RewardError(RuntimeError):
    """A reward produced no usable score."""


# (kind, model id, weights, device, dtype) -> loaded model bundle; see load_once.
_MODEL_CACHE: dict[Hashable, Any] = {}


def load_once(key: Hashable, loader: Callable[[], Any]) -> Any:
    """Return the bundle cached under ``key``, calling ``loader()`` only the first time.

    Keys name everything that makes two loads identical (model, weights, device, dtype), so that
    e.g. ``clip_score`` and ``clip_zero_shot`` on the same CLIP share one copy in memory.
    """
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = loader()
    return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Forget every cached reward model (the next build loads them again)."""
    _MODEL_CACHE.clear()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: reward models are never trained."""
    return model.eval().requires_grad_(False)


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    antialias = interpolation in ("bilinear", "bicubic")
    kwargs = {"align_corners": False} if antialias else {}
    return F.interpolate(images, size=size, mode=interpolation, antialias=antialias, **kwargs)


def preprocess_images(
    images: torch.Tensor,
    size: Union[int, Sequence[int]],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill: float = 0.0,
    crop_size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """CLIP-style preprocessing in torch, on the images' device (no PIL round trip).

    images: float [B, 3, H, W] in [0, 1] -> float [B, 3, size_h, size_w], normalised.
    resize_mode: 'shortest' (shortest edge to size, then centre crop: open_clip's and CLIP's
    default), 'longest' (longest edge to size, centre pad with ``fill``: HPSv2's), or 'squash'.
    crop_size (h, w): the centre crop after a 'shortest' resize, when it differs from ``size``
    (transformers' CLIPImageProcessor: ``size.shortest_edge`` then ``crop_size``).
    Bicubic overshoot is clamped to [0, 1], as the uint8 PIL pipeline does implicitly.
    """
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = images.shape[-2:]
    images = images.float()
    if resize_mode == "shortest":
        if th == tw:  # torchvision Resize(int): short edge -> size, long edge floored
            new = (th, int(th * w / h)) if h <= w else (int(tw * h / w), tw)
        else:
            scale = max(th / h, tw / w)
            new = (max(th, round(h * scale)), max(tw, round(w * scale)))
        images = _resize(images, new, interpolation)
        th, tw = (th, tw) if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        if th > new[0] or tw > new[1]:
            raise ValueError(f"crop {th}x{tw} is larger than the resized image {new[0]}x{new[1]}")
        top, left = int(round((new[0] - th) / 2.0)), int(round((new[1] - tw) / 2.0))
        images = images[..., top : top + th, left : left + tw]
    elif resize_mode == "longest":
        scale = min(th / h, tw / w)
        new = (min(th, round(h * scale)), min(tw, round(w * scale)))
        images = _resize(images, new, interpolation)
        pad_h, pad_w = th - new[0], tw - new[1]
        if pad_h or pad_w:
            pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            images = F.pad(images, pads, value=fill)
    elif resize_mode == "squash":
        images = _resize(images, (th, tw), interpolation)
    else:
        raise ValueError(f"resize_mode {resize_mode!r} is not one of 'shortest', 'longest', 'squash'")
    images = images.clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def hub_or_local_file(path: Optional[str], repo_id: str, filename: str) -> str:
    """A local weights file if ``path`` is given (it must exist), else ``repo_id/filename`` from the
    Hugging Face Hub (downloaded once into the hub cache)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward weights file {path!r} does not exist")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (loaded with ``weights_only=True``);
    a ``{'state_dict': ...}`` wrapper is unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state
