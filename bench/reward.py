"""The benchmark reward: a small random CNN (real convolutions, a real forward pass, no weights to fetch).

Training processes load it by path (``reward: bench/reward.py:conv_reward``), as a user reward file,
so it uses nothing but torch.
"""

from __future__ import annotations

import torch


class ConvReward(torch.nn.Module):
    """images [B, 3, H, W] in [0, 1] -> [B]: resize to 128 px, 4 strided convolutions, a linear head."""

    def __init__(self, width: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:])
        )
        self.head = torch.nn.Linear(chans[-1], 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(128, 128), mode="bilinear", antialias=False)
        for conv in self.convs:
            x = torch.nn.functional.silu(conv(x))
        return self.head(x.mean(dim=(2, 3))).squeeze(1)


_REWARD: list[ConvReward] = []


def conv_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The benchmark reward: ``ConvReward`` built once per process. prompts are ignored."""
    if not _REWARD:
        _REWARD.append(ConvReward())
    with torch.no_grad():
        return _REWARD[0](images)
