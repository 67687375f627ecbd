"""Shared fixtures: a tiny SD3 pipeline built in code, saved, and loaded back like any checkpoint."""

from __future__ import annotations

import os
import sys

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: avoid oversubscription stalls
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "train_scripts", "train_orw_cfm_w2.py")
TEST_REWARDS = os.path.join(REPO, "tests", "rewards_for_tests.py")
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "bright", "dark")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> str:
    from orw_diffusers import tiny

    path = str(tmp_path_factory.mktemp("tiny-sd3") / "pipeline")
    tiny.sd3_pipeline(words=TINY_WORDS, seed=0).save_pretrained(path)
    return path


def tiny_run_config(model_path: str, output_dir: str, **overrides) -> dict:
    """A run config small enough for a CPU test: 2 prompts x 4 images at 16 px, 4 Euler steps."""
    values = dict(
        pretrained_model_name_or_path=model_path,
        output_dir=output_dir,
        max_sequence_length=8,
        resolution=16,
        prompts=["a red cat", "a blue dog"],
        images_per_prompt=4,
        sample_batch_size=4,
        train_batch_size=4,
        num_epochs=2,
        num_sampling_steps=4,
        guidance_scale=2.0,
        rank=4,
        learning_rate=1e-3,
        temperature=1.0,
        w2_coefficient=0.1,
        reward=f"{TEST_REWARDS}:brightness",
        seed=0,
    )
    values.update(overrides)
    return values


def python() -> str:
    return sys.executable
