"""Looking at samples: image grids with captions, training-curve plots, and the diversity metric.

Used by the trainer (sample and validation grids), the evaluation report and the model card.
PIL and matplotlib are imported inside the functions that draw, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (what PIL, TensorBoard and wandb take)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(
    images: torch.Tensor,
    ncols: int,
    captions: Optional[Sequence[str]] = None,
    min_tile: int = 96,
    pad: int = 2,
    row_labels: Optional[Sequence[str]] = None,
) -> Any:
    """A ``PIL.Image`` grid of ``images`` [B, 3, H, W] in [0, 1], row-major, ``ncols`` per row.

    Tiles smaller than ``min_tile`` pixels are enlarged by an integer factor (nearest neighbour), so
    that tiny test or latent-resolution images and their captions stay readable. ``captions[i]`` is
    written under tile i; ``row_labels[r]`` (one per row, e.g. "base" / "fine-tuned") in a margin
    left of row r.
    """
    from PIL import Image, ImageDraw, ImageFont

    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    tiles = to_uint8(images)
    n, h, w = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    caption_h = 14 if captions is not None else 0
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows of {ncols} images")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # to measure the labels before the grid exists
    margin = 0 if row_labels is None else 6 + max(math.ceil(draw.textlength(str(t), font=font)) for t in row_labels)
    width = margin + ncols * (tw + pad) + pad
    grid = Image.new("RGB", (width, nrows * (th + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = margin + pad + c * (tw + pad), pad + r * (th + caption_h + pad)
        tile = Image.fromarray(tiles[i])
        if scale > 1:
            tile = tile.resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x, y))
        if captions is not None:
            draw.text((x + 1, y + th + 1), str(captions[i]), fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        draw.text((3, pad + r * (th + caption_h + pad) + th // 2), str(label), fill="black", font=font, anchor="lm")
    return grid


def save_image(image: Any, path: str) -> str:
    """Write a PIL image as PNG via a temporary file and a rename, so no reader ever sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def mean_pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over all pairs of rows: features [N, D] (or [N, ...], flattened) -> [].

    0 for fewer than two rows. Computed in float32 on the features' device.
    """
    x = features.detach().reshape(features.shape[0], -1).float()
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    return torch.pdist(x).mean()


def reward_band(rows: Sequence[dict]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The (low, high) of ``reward_mean`` ± ``reward_std`` over the rows that have ``reward_mean`` and ``epoch``,
    clipped to each round's observed ``[reward_min, reward_max]`` when the row has them: the band of a
    reward bounded in [0, 1] never leaves what was observed. None when a row lacks ``reward_std``."""
    used = [row for row in rows if "reward_mean" in row and "epoch" in row]
    if not all("reward_std" in row for row in used):
        return None
    mean = np.array([row["reward_mean"] for row in used], dtype=float)
    std = np.array([row["reward_std"] for row in used], dtype=float)
    low = np.array([row.get("reward_min", -np.inf) for row in used], dtype=float)
    high = np.array([row.get("reward_max", np.inf) for row in used], dtype=float)
    return np.maximum(mean - std, low), np.minimum(mean + std, high)


def plot_curves(
    rows: Sequence[dict], path: str, keys: Sequence[str] = ("reward_mean", "w2_loss", "diversity")
) -> Optional[str]:
    """Training curves from ``metrics.jsonl`` rows: one panel per key present, against ``epoch``.

    ``reward_mean`` gets the ``reward_band``. Uses matplotlib's Agg canvas directly (no pyplot state, no
    display). Returns ``path``, or None when no row has any of ``keys``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [k for k in keys if any(k in row for row in rows)]
    if not present:
        return None
    fig = Figure(figsize=(4.0 * len(present), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(present):
        ax = fig.add_subplot(1, len(present), i + 1)
        pts = [(row["epoch"], row[key]) for row in rows if key in row and "epoch" in row]
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        ax.plot(x, y, marker="." if len(x) < 50 else None)
        band = reward_band(rows) if key == "reward_mean" else None
        if band is not None:
            ax.fill_between(x, *band, alpha=0.2)
        ax.set_xlabel("round")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
