"""The pixel digits base: a velocity MLP on the raw 8x8 digits, in torchcfm's convention, for the paper's
"only even digits" experiment with full fine-tuning (``ORWCFMTrainer``, ``experiments/digits_pixel_sweep.py``).

No VAE and no text encoder: a sample is the 8x8 grey image itself, scaled to [-1, 1] (torchcfm's
``data_range``). ``model(t, x)`` with ``t = 0`` noise, ``t = 1`` data. Built once into the cache::

    <cache>/digits-pixel-v1/model.safetensors       the velocity MLP (EMA weights)
    <cache>/digits-pixel-v1/model.json              its constructor arguments
    <cache>/digits-pixel-v1/classifiers/            the reward CNN (on 16x16 upsampled digits, as the SD3 base's)
    <cache>/digits-pixel-v1/digits_build.json       how it was built (settings, seconds, base quality)

The class-conditional variant (``digits-pixel-cond-v1``: labels 0..9 ask for a digit, ``GENERIC_LABEL`` for
any digit, ``NULL_LABEL`` is classifier-free guidance's unconditional branch) mirrors the SD3 base's prompt mix.

The reward CNN and the SVC judge read 16x16 images: 8x8 samples are upsampled exactly as the real digits
are (``load_digit_images``), so the reward and the judge see what they were fitted on.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .classifier import save_reward_classifier, train_reward_classifier
from .data import (CLASSIFIER_DIR, DIGITS_RESOLUTION, build_once, digits_cache_dir, load_digit_images,
                   load_digit_pixels)

PIXEL_BASE_NAME = "digits-pixel-v1"
PIXEL_COND_BASE_NAME = "digits-pixel-cond-v1"
PIXEL_SIZE = 8
PIXEL_SHAPE = (1, PIXEL_SIZE, PIXEL_SIZE)
GENERIC_LABEL = 10  # "any digit"
NULL_LABEL = 11  # CFG's unconditional branch
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
#: Euler steps of the pixel base's sampler (fine-tuning rollouts and evaluation alike)
PIXEL_NUM_STEPS = 20


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1]: [B] -> [B, dim] (frequencies 1 .. 1000, geometric)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class PixelVelocityMLP(torch.nn.Module):
    """v(t, x[, y]) on [C, H, W] pixels in torchcfm's convention: an MLP over the flattened pixels and the
    time features (plus a label embedding when ``num_classes`` is set). Exposes ``in_channels``,
    ``image_size`` and ``num_classes`` like torchcfm's ``UNetModel``."""

    def __init__(self, image_shape: tuple[int, int, int] = PIXEL_SHAPE, width: int = 512, depth: int = 3,
                 time_dim: int = 64, num_classes: Optional[int] = None):  # fmt: skip
        super().__init__()
        self.in_channels, self.image_size = int(image_shape[0]), int(image_shape[-1])
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = num_classes
        self.time_dim = time_dim
        size = math.prod(self.image_shape)
        self.embed = torch.nn.Sequential(torch.nn.Linear(time_dim, width), torch.nn.SiLU())
        self.label_embed = torch.nn.Embedding(num_classes, width) if num_classes else None
        self.inp = torch.nn.Linear(size, width)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth - 1))
        self.out = torch.nn.Linear(width, size)

    def forward(self, t: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        emb = self.embed(time_features(t.to(x.dtype), self.time_dim))
        if self.label_embed is not None:
            if y is None:
                raise ValueError("PixelVelocityMLP: a class-conditional model needs y")
            emb = emb + self.label_embed(y)
        h = F.silu(self.inp(x.flatten(1)) + emb)
        for layer in self.hidden:
            h = F.silu(layer(h) + emb)
        return self.out(h).view_as(x)


def pixel_mlp(**kwargs: Any) -> PixelVelocityMLP:
    """``model_factory: orw_diffusers.digits.pixel:pixel_mlp`` (kwargs: ``PixelVelocityMLP``'s)."""
    if "image_shape" in kwargs:
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
    return PixelVelocityMLP(**kwargs)


def pixel_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits at their own 8x8 size: (pixels float[N, 1, 8, 8] in [-1, 1], labels long[N])."""
    pixels, labels = load_digit_pixels(split)
    return pixels * 2 - 1, labels


def to_judge_images(images: torch.Tensor) -> torch.Tensor:
    """8x8 images [B, 1 or 3, 8, 8] in [0, 1] -> [B, 3, 16, 16], upsampled as ``load_digit_images`` does."""
    grey = images.float().mean(1, keepdim=True)
    up = F.interpolate(grey, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False).clamp(0, 1)
    return up.repeat(1, 3, 1, 1)


@dataclass(frozen=True)
class PixelBuildSettings:
    width: int = 512
    depth: int = 3
    steps: int = 20000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    classifier_epochs: int = 40
    conditional: bool = False
    null_share: float = 0.1  # conditional: shares of the null and the generic label; the rest is the digit's
    generic_share: float = 0.6

    @classmethod
    def mini(cls, conditional: bool = False) -> "PixelBuildSettings":
        return cls(width=32, depth=2, steps=20, batch_size=16, classifier_epochs=1, conditional=conditional)


def model_kwargs(settings: PixelBuildSettings) -> dict[str, Any]:
    return {"width": settings.width, "depth": settings.depth, "num_classes": NULL_LABEL + 1 if settings.conditional else None}


def train_pixel_mlp(settings: PixelBuildSettings, seed: int = 0, progress: bool = True) -> PixelVelocityMLP:
    """Plain conditional flow matching in torchcfm's convention (x_t = t x1 + (1 - t) x0, u = x1 - x0) on
    the training split; returns the EMA model."""
    from ..progress import progress_bar

    torch.manual_seed(seed)
    pixels, labels = pixel_digits("train")
    model = PixelVelocityMLP(width=settings.width, depth=settings.depth,
                             num_classes=NULL_LABEL + 1 if settings.conditional else None)  # fmt: skip
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # a cosine decay to 5%: the late low-lr steps sharpen the samples
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.05 + 0.475 * (1 + math.cos(math.pi * min(k, settings.steps) / settings.steps)))
    for step in progress_bar(range(settings.steps), desc="building pixel digits base", enabled=progress):
        idx = torch.randint(len(pixels), (settings.batch_size,))
        x1, x0 = pixels[idx], torch.randn(settings.batch_size, *PIXEL_SHAPE)
        t = torch.rand(settings.batch_size)
        x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        y = None
        if settings.conditional:
            u = torch.rand(settings.batch_size)
            y = torch.where(u < settings.null_share, NULL_LABEL,
                            torch.where(u < settings.null_share + settings.generic_share, GENERIC_LABEL, labels[idx]))
        loss = F.mse_loss(model(t, x_t, y), x1 - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
    return ema.eval()


@torch.no_grad()
def sample_pixel_digits(model: torch.nn.Module, n: int, seed: int = 0, num_steps: int = PIXEL_NUM_STEPS,
                        label: Optional[int] = None, guidance_scale: float = 1.0, batch_size: int = 500) -> torch.Tensor:
    """``n`` samples of ``model`` (Euler in t, torchcfm's convention) -> images [n, 1, 8, 8] in [0, 1].

    A class-conditional model needs ``label`` (and uses ``NULL_LABEL`` for guidance > 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        x = torch.randn(min(batch_size, n - start), *PIXEL_SHAPE, generator=g).to(device)
        b = len(x)
        y = None if label is None else torch.full((b,), label, dtype=torch.long, device=device)
        for k in range(num_steps):
            t = torch.full((b,), k / num_steps, device=device)
            v = model(t, x, y) if y is not None else model(t, x)
            if guidance_scale > 1:
                v_null = model(t, x, torch.full((b,), NULL_LABEL, dtype=torch.long, device=device))
                v = v_null + guidance_scale * (v - v_null)
            x = x + v / num_steps
        out.append(((x + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def build_pixel_base(out_dir: str, seed: int = 0, settings: Optional[PixelBuildSettings] = None,
                     progress: bool = True) -> str:
    """Train the pixel base and its reward CNN into ``out_dir`` (written to a temporary sibling, then renamed)."""
    from safetensors.torch import save_file

    from .judge import evaluate_images

    settings = settings or PixelBuildSettings()
    start = time.time()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp_dir, 0o755)
    try:
        model = train_pixel_mlp(settings, seed, progress)
        train_seconds = time.time() - start
        images, labels = load_digit_images("train")
        classifier = train_reward_classifier(images, labels, epochs=settings.classifier_epochs, seed=seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp_dir, MODEL_FILE))
        with open(os.path.join(tmp_dir, MODEL_CONFIG_FILE), "w") as f:
            json.dump(model_kwargs(settings), f)
        save_reward_classifier(classifier, os.path.join(tmp_dir, CLASSIFIER_DIR))
        label = GENERIC_LABEL if settings.conditional else None
        report = evaluate_images(to_judge_images(sample_pixel_digits(model, 1000, seed=seed + 1, label=label)))
        info = {"seed": seed, "settings": asdict(settings), "train_seconds": round(train_seconds, 1),
                "build_seconds": round(time.time() - start, 1), "num_steps": PIXEL_NUM_STEPS, "base_quality": report}
        with open(os.path.join(tmp_dir, "digits_build.json"), "w") as f:
            json.dump(info, f, indent=2)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not is_complete(out_dir):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def is_complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in (MODEL_FILE, MODEL_CONFIG_FILE, "digits_build.json", CLASSIFIER_DIR))


def ensure_pixel_base(cache_dir: Optional[str] = None, conditional: bool = False, seed: int = 0,
                      progress: bool = True) -> str:
    """The cached pixel base ``<cache>/digits-pixel-v1`` (``-cond-v1``: the class-conditional one); built if missing,
    by one process at a time (``data.build_once``)."""
    path = os.path.join(digits_cache_dir(cache_dir), PIXEL_COND_BASE_NAME if conditional else PIXEL_BASE_NAME)
    settings = PixelBuildSettings(conditional=conditional)
    return build_once(path, is_complete, lambda: build_pixel_base(path, seed=seed, settings=settings, progress=progress))


def load_pixel_model(path: str) -> PixelVelocityMLP:
    """The velocity MLP saved by ``build_pixel_base`` in ``path`` (eval mode, CPU)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
        kwargs = json.load(f)
    model = PixelVelocityMLP(**kwargs)
    model.load_state_dict(load_file(os.path.join(path, MODEL_FILE)))
    return model.eval()


#: the robust reward CNN, trained on first use next to the base's own (``pixel_digit_reward(robust=True)``)
ROBUST_CLASSIFIER_DIR = "classifiers-robust-v1"


def ensure_robust_classifier(base_path: str, seed: int = 0) -> str:
    """``<base>/classifiers-robust-v1``: the reward CNN trained with adversarial copies of its digits and
    off-manifold images towards uniform (``classifier.train_reward_classifier(robust=True)``, about 40 s on
    one core); built once, under a lock, and written to a temporary sibling first."""
    path = os.path.join(base_path, ROBUST_CLASSIFIER_DIR)

    def build() -> None:
        images, labels = load_digit_images("train")
        tmp_dir = tempfile.mkdtemp(prefix=ROBUST_CLASSIFIER_DIR + ".tmp-", dir=base_path)
        try:
            save_reward_classifier(train_reward_classifier(images, labels, seed=seed, robust=True), tmp_dir)
            os.rename(tmp_dir, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    return build_once(path, os.path.isdir, build)


def pixel_digit_reward(base_path: str, classes: tuple[int, ...], device: Any = "cpu", robust: bool = False):
    """Reward for ``ORWCFMTrainer``: ``images [B, 1, 8, 8] in [0, 1] -> P(class in classes)`` under the base's CNN.

    ``robust``: under the robust CNN (``ensure_robust_classifier``), which gives an image that is no digit
    about uniform class probabilities; the base's own CNN is easy to fool (docs/results.md).
    """
    from .classifier import load_reward_classifier

    folder = ensure_robust_classifier(base_path) if robust else os.path.join(base_path, CLASSIFIER_DIR)
    cnn = load_reward_classifier(folder, device)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[list(classes)] = True

    @torch.no_grad()
    def reward(images: torch.Tensor) -> torch.Tensor:
        probs = cnn(to_judge_images(images).to(device)).softmax(-1).cpu()
        return probs[:, mask].sum(-1)

    return reward
