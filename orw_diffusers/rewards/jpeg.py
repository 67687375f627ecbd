"""DDPO's JPEG (in)compressibility rewards (Black et al., ICLR 2024): the size of each image
saved as a quality-95 JPEG with PIL, in kB (1 kB = 1000 bytes)."""

from __future__ import annotations

import io
from typing import Any, Callable

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """images: float [B, 3, H, W] in [0, 1] -> JPEG sizes in kB, float32 [B] on CPU."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(
    device: Any = "cpu", dtype: Any = torch.float32, batch_size: int = 32, quality: int = 95
) -> RewardFn:
    """Reward = -size_kB: smaller files score higher. Runs on the CPU (PIL); device, dtype and
    batch_size are accepted for the common factory signature and unused."""
    return lambda images, prompts: -jpeg_sizes_kb(images, quality)


def jpeg_incompressibility(
    device: Any = "cpu", dtype: Any = torch.float32, batch_size: int = 32, quality: int = 95
) -> RewardFn:
    """Reward = +size_kB: larger files score higher."""
    return lambda images, prompts: jpeg_sizes_kb(images, quality)
