"""The judge of the digits demo: an SVC on pixels that fine-tuning never sees, and the reports it makes.

``evaluate_images`` gives the class histogram, P(even), the even-class entropy and the confident share
relative to real held-out digits; the reward CNN (``classifier.py``) is a different model family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import DIGITS_RESOLUTION, EVEN_DIGITS, load_digit_images

CONFIDENCE_THRESHOLD = 0.9
_EVAL_CLASSIFIER = None  # fitted on first use, once per process


def eval_classifier():
    """The judge: an RBF SVC (calibrated probabilities) on 8x8 grey pixels of the training split.

    A different model family from the reward CNN and never seen by fine-tuning. Fitting takes about a second
    and is deterministic, so it is refitted once per process instead of being pickled into the cache.
    """
    global _EVAL_CLASSIFIER
    if _EVAL_CLASSIFIER is None:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        images, labels = load_digit_images("train")
        _EVAL_CLASSIFIER = CalibratedClassifierCV(SVC(gamma=0.001), ensemble=False).fit(_svc_features(images), labels.numpy())
    return _EVAL_CLASSIFIER


def _svc_features(images: torch.Tensor):
    """[B, 3, 16, 16] in [0, 1] -> numpy [B, 64] on sklearn's 0..16 scale (grey, 2x2 average pooled)."""
    return (F.avg_pool2d(images.float().cpu().mean(1, keepdim=True), 2).flatten(1) * 16).numpy()


def _confident_share(probs: torch.Tensor) -> float:
    return (probs.max(1).values >= CONFIDENCE_THRESHOLD).float().mean().item()


def judge_probs(images: torch.Tensor) -> torch.Tensor:
    """The judge's class probabilities, float64[B, 10]. images: float[B, 3, 16, 16] in [0, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        raise ValueError(f"images must be [B, 3, {DIGITS_RESOLUTION}, {DIGITS_RESOLUTION}], got {tuple(images.shape)}")
    return torch.as_tensor(eval_classifier().predict_proba(_svc_features(images)))


def subset_entropy(histogram: torch.Tensor, classes: tuple[int, ...] = EVEN_DIGITS) -> float:
    """Entropy in nats of a 10-class histogram restricted to ``classes`` and renormalised (max ln 5 = 1.609 for
    five classes; 0 if they hold nothing). The demo's "even-class entropy" is the default."""
    part = histogram.double()[list(classes)]
    total = part.sum()
    if total <= 0:
        return 0.0
    q = part[part > 0] / total
    return max(0.0, float(-(q * q.log()).sum()))  # never -0.0


def evaluate_images(images: torch.Tensor) -> dict:
    """Judge samples with the evaluation classifier. images: float[B, 3, 16, 16] in [0, 1].

    Returns ``histogram`` (10 class fractions), ``p_even`` (fraction classified even), ``even_entropy``
    (entropy in nats of the class distribution restricted to even classes; max ln 5 = 1.609),
    ``confident_share`` (max-prob >= CONFIDENCE_THRESHOLD), ``real_confident_share`` (the same on the
    real held-out digits) and ``relative_confident_share`` (their ratio: confidence is relative to the judge).
    """
    probs = judge_probs(images)
    heldout, _ = load_digit_images("heldout")
    real_share = _confident_share(judge_probs(heldout))
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    share = _confident_share(probs)
    return {"histogram": [round(h, 4) for h in histogram.tolist()], "p_even": histogram[0::2].sum().item(),
            "even_entropy": subset_entropy(histogram), "num_samples": len(probs),
            "confident_share": share, "real_confident_share": real_share, "relative_confident_share": share / real_share}
