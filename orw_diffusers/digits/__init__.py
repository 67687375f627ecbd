"""The "digits" base model: a real ``StableDiffusion3Pipeline`` trained on CPU on scikit-learn's 8x8 digits.

This is the miniature of the ORW-CFM-W2 paper's MNIST "only even digits" experiment. The base is built
once (a few minutes on two CPU cores), saved with ``save_pretrained`` and afterwards loaded like any SD3
checkpoint::

    path = ensure_digits_base()  # <cache>/digits-sd3-v2/, built only if missing
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    images = pipe(GENERIC_PROMPT, num_inference_steps=DIGITS_NUM_STEPS, guidance_scale=DIGITS_GUIDANCE_SCALE,
                  max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH, output_type="pt").images  # [B, 3, 16, 16]

The parts, each importing only those above it (nothing here imports ``orw_diffusers.rewards``; the digit
rewards import this package):

- ``data.py``: constants, prompts, the cache location, the sklearn digits and their held-out split;
- ``classifier.py``: the reward CNN (trained by the build, read back by ``rewards/digits.py``);
- ``base.py``: the build (``build_digits_base``, ``ensure_digits_base``), loading and sampling;
- ``judge.py``: the SVC judge and ``evaluate_images``;
- ``cli.py`` (``python -m orw_diffusers.digits build|evaluate``): the base-quality report.
"""

from .data import (
    BASE_NAME, CLASSIFIER_DIR, DIGITS_GUIDANCE_SCALE, DIGITS_MAX_SEQUENCE_LENGTH, DIGITS_NUM_STEPS, DIGITS_RESOLUTION,
    DIGITS_TOKENIZER_MAX_LENGTH, DIGITS_WORDS, EVEN_DIGITS, GENERIC_PROMPT, HELDOUT_FRACTION, NEGATIVE_PROMPT,
    SPLIT_SEED, digits_cache_dir, load_digit_images, specific_prompt,
)  # fmt: skip
from .classifier import DigitCNN, load_reward_classifier, save_reward_classifier, train_reward_classifier
from .base import BuildSettings, build_digits_base, ensure_digits_base, generate_digits, load_digits_pipeline
from .judge import CONFIDENCE_THRESHOLD, eval_classifier, evaluate_images, judge_probs, subset_entropy
from .cli import evaluate_base, main

__all__ = [
    "BASE_NAME", "CLASSIFIER_DIR", "CONFIDENCE_THRESHOLD", "DIGITS_GUIDANCE_SCALE", "DIGITS_MAX_SEQUENCE_LENGTH",
    "DIGITS_NUM_STEPS", "DIGITS_RESOLUTION", "DIGITS_TOKENIZER_MAX_LENGTH", "DIGITS_WORDS", "EVEN_DIGITS",
    "GENERIC_PROMPT", "HELDOUT_FRACTION", "NEGATIVE_PROMPT", "SPLIT_SEED",
    "BuildSettings", "DigitCNN", "build_digits_base", "digits_cache_dir", "ensure_digits_base", "eval_classifier",
    "evaluate_base", "evaluate_images", "generate_digits", "judge_probs", "load_digit_images", "load_digits_pipeline",
    "load_reward_classifier", "main", "save_reward_classifier", "specific_prompt", "subset_entropy",
    "train_reward_classifier",
]  # fmt: skip
