"""Digit-classifier rewards for the digits demo: ``digit_even`` = P(even digit), ``digit_in`` = P(digit in a set).

The reward classifier is a small CNN trained while the digits base is built (see ``orw_diffusers.digits``)
on real training digits and their VAE reconstructions, i.e. on images like the pipeline decodes. It is
stored as safetensors in ``<base>/classifiers/``. Results are judged by a different model (an SVC,
``orw_diffusers.digits.evaluate_images``) that fine-tuning never sees.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
WEIGHTS_FILE = "reward_cnn.safetensors"
CONFIG_FILE = "reward_cnn.json"


class DigitCNN(nn.Module):
    """[B, 3, 16, 16] in [0, 1] -> logits [B, 10]. Three convs (16 -> 8 -> 4 pixels), global pooling, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(4 * width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel shifts and mild pixel noise, so the reward does not hinge on exact pixel placement."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    shifted = torch.roll(images, shifts=shifts, dims=(2, 3))
    return (shifted + 0.05 * torch.randn(shifted.shape, generator=generator)).clamp(0, 1)


def train_reward_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 40, seed: int = 0,
                            on_epoch: Optional[Callable[[], None]] = None) -> DigitCNN:
    """Train the reward CNN. images: float[N, 3, 16, 16] in [0, 1]; labels: long[N]. Returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(_augment(images[idx], generator)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()
    return model.eval().requires_grad_(False)


def save_reward_classifier(model: DigitCNN, folder: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"width": model.width, "input": "float[B, 3, 16, 16] in [0, 1]", "classes": list(range(10))}, f)


def load_reward_classifier(base_path: Optional[str] = None, cache_dir: Optional[str] = None,
                           device: str | torch.device = "cpu") -> DigitCNN:
    """The reward CNN of the base at ``base_path`` (default: the cached base, built if missing), in eval mode."""
    from safetensors.torch import load_file

    from ..digits import CLASSIFIER_DIR, ensure_digits_base

    folder = os.path.join(base_path or ensure_digits_base(cache_dir), CLASSIFIER_DIR)
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        model = DigitCNN(width=json.load(f)["width"])
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
    return model.to(device).eval().requires_grad_(False)


def _class_set_reward(classes: list[int], device: str | torch.device, base_path: Optional[str],
                      cache_dir: Optional[str]) -> RewardFn:
    model = load_reward_classifier(base_path, cache_dir, device)
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
    from ..digits import EVEN_DIGITS

    return _class_set_reward(list(EVEN_DIGITS), device, base_path, cache_dir)


def digit_in(device: str | torch.device = "cpu", digits: Iterable[int] = (), base_path: Optional[str] = None,
             cache_dir: Optional[str] = None) -> RewardFn:
    """Reward = P(the image's digit is in ``digits``) under the reward CNN; ``digits``: non-empty ints in 0..9."""
    given = digits
    digits = list(digits) if isinstance(digits, (list, tuple, set, frozenset, range)) else [digits]
    if not digits or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and 0 <= d <= 9 for d in digits):
        raise ValueError(f"digit_in: digits must be a non-empty list of ints in 0..9, got {given!r}")
    return _class_set_reward(sorted({int(d) for d in digits}), device, base_path, cache_dir)
