"""The digits demo's constants and data: prompts, sizes, the cache location and scikit-learn's 8x8 digits.

A leaf: it imports nothing else of the package, so the digit rewards and every other part can depend on it.

Data: ``sklearn.datasets.load_digits`` (1,797 images, 0..16), upscaled bilinearly to 16x16, grey -> 3 channels.
A stratified 20% held-out split (fixed seed, independent of the build seed) trains nothing; it only
calibrates the evaluation ("how confident is the judge on real digits?").
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

DIGITS_RESOLUTION = 16
# Without T5, encode_prompt pads the context with `max_sequence_length` zero tokens; the diffusers default
# (256) would dwarf the 16 image tokens. Use this value in training and in every pipeline call.
DIGITS_MAX_SEQUENCE_LENGTH = 2
# "<bos> a handwritten digit 7 <eos>" is exactly 6 tokens; every context token costs as much as an image token
DIGITS_TOKENIZER_MAX_LENGTH = 6
DIGITS_WORDS = ("a", "handwritten", "digit") + tuple(str(d) for d in range(10))
GENERIC_PROMPT = "a handwritten digit"
NEGATIVE_PROMPT = ""
DIGITS_GUIDANCE_SCALE = 2.0
DIGITS_NUM_STEPS = 20
BASE_NAME = "digits-sd3-v2"
#: the name ``pretrained_model_name_or_path`` gives the cached base (built when missing); never a Hub id
DIGITS_MODEL_NAME = "orw-diffusers/digits"
CLASSIFIER_DIR = "classifiers"
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0  # the held-out split never changes with the build seed
EVEN_DIGITS = (0, 2, 4, 6, 8)


def specific_prompt(digit: int) -> str:
    """The prompt that asks for one digit, e.g. ``"a handwritten digit 7"``."""
    return f"{GENERIC_PROMPT} {int(digit)}"


def digits_cache_dir(cache_dir: Optional[str] = None) -> str:
    """``cache_dir``, else ``$ORW_DIFFUSERS_CACHE``, else ``~/.cache/orw_diffusers``."""
    return cache_dir or os.environ.get("ORW_DIFFUSERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "orw_diffusers")


def build_once(path: str, is_complete: Callable[[str], bool], build: Callable[[], Any]) -> str:
    """``path``, after ``build()`` if it is not complete: the first process builds, under an exclusive lock
    on ``<path>.lock`` next to it; the others wait on the lock, then find ``path`` complete and reuse it."""
    if is_complete(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; builds that race still publish by an atomic rename
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not is_complete(path):
            build()
    return path


def load_digit_pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` in {"train", "heldout"} -> (the raw 8x8 digits float[N, 1, 8, 8] in [0, 1], labels long[N])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    data = load_digits()
    train_idx, heldout_idx = train_test_split(
        range(len(data.target)), test_size=HELDOUT_FRACTION, stratify=data.target, random_state=SPLIT_SEED
    )
    idx = torch.as_tensor(train_idx if split == "train" else heldout_idx)
    return torch.as_tensor(data.images, dtype=torch.float32)[idx, None] / 16.0, torch.as_tensor(data.target)[idx].long()


def load_digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` in {"train", "heldout"} -> (images float[N, 3, 16, 16] in [0, 1], labels long[N])."""
    pixels, labels = load_digit_pixels(split)  # [N, 1, 8, 8]
    images = F.interpolate(pixels, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1), labels


