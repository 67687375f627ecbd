"""The reward CNN of the digits base: trained while the base is built, stored in ``<base>/classifiers/``.

It is trained on real training digits and their VAE reconstructions, i.e. on images like the pipeline
decodes, and read back by the digit rewards (``orw_diffusers.rewards.digits``). Results are judged by a
different model (an SVC, ``orw_diffusers.digits.judge``) that fine-tuning never sees.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def off_manifold(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit, [B, 3, 16, 16] in [0, 1], the kinds a reward hack drifts to: uniform noise,
    saturated random blocks (8 x 8 cells upsampled), digits with their pixels shuffled, and digits pushed to
    extremes (a contrast 3-10x around 0.5)."""
    n = len(like)
    kind = torch.randint(0, 4, (n,), generator=generator)
    noise = torch.rand(like.shape, generator=generator)
    cells = (torch.rand(n, 1, 8, 8, generator=generator) > 0.5).float()
    blocks = F.interpolate(cells, size=like.shape[-2:], mode="nearest").expand_as(like)
    perm = torch.randperm(like[0, 0].numel(), generator=generator)
    shuffled = like.flatten(2)[:, :, perm].reshape(like.shape)
    gain = 3 + 7 * torch.rand(n, 1, 1, 1, generator=generator)
    saturated = ((like - 0.5) * gain + 0.5).clamp(0, 1)
    out = torch.stack([noise, blocks, shuffled, saturated], dim=1)  # [B, 4, 3, H, W]
    return out[torch.arange(n), kind]


def _fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` that raises the loss of the true labels (Goodfellow et al., 2015)."""
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def train_reward_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 40, seed: int = 0,
                            on_epoch: Optional[Callable[[], None]] = None, robust: bool = False) -> DigitCNN:
    """Train the reward CNN. images: float[N, 3, 16, 16] in [0, 1]; labels: long[N]. Returns it in eval mode.

    ``robust``: each batch also trains adversarial copies of its digits (FGSM, eps 0.1) on their labels, and
    as many off-manifold images (``off_manifold``) towards the uniform distribution over the ten classes
    (outlier exposure, Hendrycks et al., 2019), so that an image that is no digit scores P(even) near 0.5.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            batch = _augment(images[idx], generator)
            loss = F.cross_entropy(model(batch), labels[idx])
            if robust:
                loss = loss + F.cross_entropy(model(_fgsm(model, batch, labels[idx], 0.1)), labels[idx])
                outliers = model(off_manifold(batch, generator))
                loss = loss - 0.5 * outliers.log_softmax(-1).mean()  # cross-entropy to the uniform distribution
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


def load_reward_classifier(folder: str, device: str | torch.device = "cpu") -> DigitCNN:
    """The reward CNN saved in ``folder`` (``<base>/classifiers``) by ``save_reward_classifier``, in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        model = DigitCNN(width=json.load(f)["width"])
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
    return model.to(device).eval().requires_grad_(False)

