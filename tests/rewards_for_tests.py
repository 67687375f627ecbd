"""Rewards used by the tests through the user-callable syntax ``file.py:function``."""

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value in percent: [B]."""
    return 100.0 * images.mean(dim=(1, 2, 3))


def darkness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return -100.0 * images.mean(dim=(1, 2, 3))


def left_bright(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Brightness of the left half minus the right half, in percent: [B].

    Unlike the global mean, this survives the decoder's final GroupNorm, which normalises away
    global shifts, so a tiny random pipeline can learn it in a few dozen rounds.
    """
    w = images.shape[-1] // 2
    return 100.0 * (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3)))
