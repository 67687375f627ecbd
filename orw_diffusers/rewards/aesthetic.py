"""The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

An MLP on the L2-normalised CLIP ViT-L/14 image embedding; the layer layout (and so the state
dict keys ``layers.{0,2,4,6,7}``) is the original's: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with
dropout between the first layers, no activations. Scores are roughly 1..10.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..dtypes import named_dtype
from .clip import OpenClipBundle, load_open_clip
from .common import freeze, hub_or_local_file, load_once, load_state_dict_file

_LINEAR_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


class AestheticMLP(nn.Module):
    """The predictor's MLP; ``sizes`` = (768, 1024, 128, 64, 16, 1) for the published weights."""

    def __init__(self, sizes: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        a, b, c, d, e, f = sizes
        self.layers = nn.Sequential(
            nn.Linear(a, b),
            nn.Dropout(0.2),
            nn.Linear(b, c),
            nn.Dropout(0.2),
            nn.Linear(c, d),
            nn.Dropout(0.1),
            nn.Linear(d, e),
            nn.Linear(e, f),
        )

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: [B, D] unit-norm CLIP image embeddings -> scores [B, 1]."""
        return self.layers(embeddings)


def aesthetic_mlp(state_dict: dict[str, torch.Tensor]) -> AestheticMLP:
    """The predictor's MLP with its sizes read from ``state_dict`` (strictly loaded)."""
    missing = [k for k in _LINEAR_KEYS if f"{k}.weight" not in state_dict]
    if missing:
        raise ValueError(f"aesthetic: weights lack {missing}; expected the improved-aesthetic-predictor MLP")
    shapes = [state_dict[f"{k}.weight"].shape for k in _LINEAR_KEYS]  # (out, in) each
    mlp = AestheticMLP([shapes[0][1]] + [s[0] for s in shapes])
    mlp.load_state_dict(state_dict)
    return mlp


class Aesthetic:
    """The predicted aesthetic score: float32 [B] on CPU."""

    def __init__(self, bundle: OpenClipBundle, mlp: nn.Module, batch_size: int):
        self.bundle, self.mlp, self.batch_size = bundle, mlp, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_emb = self.bundle.image_features(images, self.batch_size)  # [B, D], unit norm
        param = next(self.mlp.parameters())
        return self.mlp(image_emb.to(param.dtype)).float().reshape(-1).cpu()


def aesthetic(
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    batch_size: int = 32,
    weights: Optional[str] = None,
    weights_repo: str = "trl-lib/ddpo-aesthetic-predictor",
    weights_filename: str = "aesthetic-model.pth",
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: Optional[str] = "openai",
) -> Aesthetic:
    """``weights``: a local ``.safetensors`` / ``.pth`` state dict of the MLP, else
    ``weights_repo/weights_filename`` from the Hub (the DDPO / TRL copy of ``sac+logos+ava1-l14-linearMSE``)."""
    dtype = named_dtype(dtype)
    bundle = load_open_clip(clip_model, clip_pretrained, device, dtype)
    path = hub_or_local_file(weights, weights_repo, weights_filename)
    mlp = load_once(
        ("aesthetic_mlp", path, str(bundle.device), dtype),
        lambda: freeze(aesthetic_mlp(load_state_dict_file(path)).to(bundle.device, dtype)),
    )
    embed_dim = getattr(bundle.model.visual, "output_dim", mlp.in_features)
    if mlp.in_features != embed_dim:
        raise ValueError(
            f"aesthetic: the MLP takes {mlp.in_features}-d embeddings but {clip_model!r} gives {embed_dim}-d"
        )
    return Aesthetic(bundle, mlp, batch_size)
