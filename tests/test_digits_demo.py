"""The digits demo's plumbing on the mini base: one round through the real training script with
configs/digits_even.yaml, and the alpha sweep's --quick mode. Quality targets are checked by the
sweep itself (docs/results.md), not here."""

import importlib.util
import json
import math
import os

import pytest
import torch
import yaml

torch.set_num_threads(1)

from conftest import REPO, TRAIN_SCRIPT  # noqa: E402
from orw_diffusers import digits  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "digits_even.yaml")


@pytest.fixture(scope="module")
def mini_base(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("orw_cache") / digits.BASE_NAME)
    return digits.build_digits_base(path, seed=0, mini=True, progress=False)


def test_config_is_the_digits_setup():
    cfg = yaml.safe_load(open(CONFIG))
    assert cfg["prompts"] == [digits.GENERIC_PROMPT] and cfg["reward"] == "digit_even"
    assert cfg["resolution"] == digits.DIGITS_RESOLUTION
    assert cfg["max_sequence_length"] == digits.DIGITS_MAX_SEQUENCE_LENGTH
    assert cfg["guidance_scale"] == digits.DIGITS_GUIDANCE_SCALE and cfg["load_t5"] is False


@pytest.fixture(scope="module")
def one_round(mini_base, tmp_path_factory):
    """(exit code, output dir) of one round of configs/digits_even.yaml on the mini base, through the real script."""
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("digits_run") / "out"
    reward = json.dumps([{"name": "digit_even", "kwargs": {"base_path": mini_base}}])  # the mini base's CNN
    argv = ["--config", CONFIG, "--pretrained_model_name_or_path", mini_base, "--output_dir", str(out),
            "--num_epochs", "1", "--images_per_prompt", "4", "--sample_batch_size", "4", "--train_batch_size", "4",
            "--num_sampling_steps", "2", "--reward", reward]  # fmt: skip
    return script.main(argv), out


def test_one_round_through_the_train_script(mini_base, one_round):
    rc, out = one_round
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["samples_seen"] == 4
    for key in ("reward_mean", "loss", "fm_loss", "w2_loss", "ess"):
        assert math.isfinite(rows[0][key]), key
    assert 0.0 <= rows[0]["reward_mean"] <= 1.0
    assert 0.0 <= rows[0]["eval/digit_judge_even_mean"] <= 1.0  # the config's held-out judge, logged per round
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "config.yaml").exists()
    # the demo's way back in: plain diffusers + load_lora_weights
    pipe = digits.load_digits_pipeline(mini_base)
    pipe.load_lora_weights(str(out))
    images = digits.generate_digits(pipe, [digits.GENERIC_PROMPT] * 4, seed=0, num_inference_steps=2)
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()


def test_alpha_sweep_quick(mini_base, tmp_path):
    from experiments import digits_alpha_sweep

    docs = os.path.join(REPO, "docs", "results.md")
    before = open(docs).read()
    rc = digits_alpha_sweep.main(["--quick", "--base", mini_base, "--work_dir", str(tmp_path / "work"),
                                  "--set", "sampling_solver=heun"])
    assert rc == 0
    assert open(docs).read() == before  # without --output a plumbing run writes into its work dir, never docs/
    text = (tmp_path / "work" / "results.md").read_text()
    assert "2 heun sampling steps" in text  # --set reaches every run and the settings line
    for run in ("alpha0-s0", "control-s0"):
        assert yaml.safe_load((tmp_path / "work" / run / "config.yaml").read_text())["sampling_solver"] == "heun"
    for row in ("| alpha = 0 |", "| control: uniform weights, alpha = 0 |", "| odd digits, alpha = "):
        assert row in text, row
    assert (tmp_path / "work" / "img" / "digits_base.png").exists()
    results = json.loads((tmp_path / "work" / "sweep_results.json").read_text())["results"]
    assert len(results) == 3 and all(math.isfinite(r["w2_final"]) for r in results)
    for bad in ("sampling_solver", "sampling_solverr=heun", "w2_coefficient=0.5"):  # argparse errors, before any run
        with pytest.raises(SystemExit) as exit_info:
            digits_alpha_sweep.main(["--quick", "--set", bad])
        assert exit_info.value.code == 2
