"""Digit-classifier rewards for the digits demo: ``digit_even`` = P(even digit), ``digit_in`` = P(digit in a set);
and the same two under the demo's judge, ``digit_judge_even`` and ``digit_judge_in``: held-out rewards
(``eval_reward``) that fine-tuning never trains on.

The reward classifier is a small CNN trained while the digits base is built (``orw_diffusers.digits.classifier``)
on real training digits and their VAE reconstructions, i.e. on images like the pipeline decodes. It is
stored as safetensors in ``<base>/classifiers/``. Results are judged by a different model (an SVC,
``orw_diffusers.digits.evaluate_images``) that fine-tuning never sees.

Imports go one way: this module uses ``orw_diffusers.digits``, which never imports ``orw_diffusers.rewards``.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Iterable, Optional

import torch

from . import RewardFn
from ..digits.base import ensure_digits_base
from ..digits.classifier import load_reward_classifier
from ..digits.data import CLASSIFIER_DIR, EVEN_DIGITS


def _class_set_reward(classes: list[int], device: str | torch.device, base_path: Optional[str],
                      cache_dir: Optional[str]) -> RewardFn:
    # the CNN of the base at base_path (default: the cached base, built if missing)
    model = load_reward_classifier(os.path.join(base_path or ensure_digits_base(cache_dir), CLASSIFIER_DIR), device)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[classes] = True
    mask = mask.to(device)

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images: float[B, 3, 16, 16] in [0, 1] -> float[B] in [0, 1], P(class in the set). Prompts are unused."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, 16, 16):
            raise ValueError(f"digit rewards take images [B, 3, 16, 16], got {tuple(images.shape)}")
        probs = model(images.to(device, torch.float32)).softmax(-1)  # [B, 10]
        return probs[:, mask].sum(-1)

    return reward


def digit_even(device: str | torch.device = "cpu", base_path: Optional[str] = None,
               cache_dir: Optional[str] = None) -> RewardFn:
    """Reward = P(the image is an even digit) under the reward CNN (the paper's MNIST "only even digits")."""
    return _class_set_reward(list(EVEN_DIGITS), device, base_path, cache_dir)


def _digit_set(name: str, digits: Any) -> list[int]:
    given = digits
    digits = list(digits) if isinstance(digits, (list, tuple, set, frozenset, range)) else [digits]
    if not digits or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and 0 <= d <= 9 for d in digits):
        raise ValueError(f"{name}: digits must be a non-empty list of ints in 0..9, got {given!r}")
    return sorted({int(d) for d in digits})


def digit_in(device: str | torch.device = "cpu", digits: Iterable[int] = (), base_path: Optional[str] = None,
             cache_dir: Optional[str] = None) -> RewardFn:
    """Reward = P(the image's digit is in ``digits``) under the reward CNN; ``digits``: non-empty ints in 0..9."""
    return _class_set_reward(_digit_set("digit_in", digits), device, base_path, cache_dir)


def digit_judge_in(digits: Iterable[int] = ()) -> RewardFn:
    """P(the image's digit is in ``digits``) under the demo's judge (``digits.judge``: an RBF SVC on pixels, a
    different model family from the reward CNN). Images [B, 3, H, W] in [0, 1] of any size are resized to
    16 x 16 as ``digits.pixel.to_judge_images`` does (the pixel base's 8 x 8 samples)."""
    classes = _digit_set("digit_judge_in", digits)

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from ..digits.data import DIGITS_RESOLUTION
        from ..digits.judge import judge_probs
        from ..digits.pixel import to_judge_images

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"digit judge rewards take images [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
            images = to_judge_images(images)
        return judge_probs(images.cpu())[:, classes].sum(-1).float()

    return reward


def digit_judge_even() -> RewardFn:
    """P(even digit) under the demo's judge: the digits demo's held-out reward (see ``digit_judge_in``)."""
    return digit_judge_in(EVEN_DIGITS)
