"""End-to-end training: the reward rises, the outputs are written, and 2 processes equal 1."""

import importlib.util
import json
import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, TRAIN_SCRIPT, for_objective, python, tiny_run_config
from orw_diffusers.config import TrainConfig
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer

def test_training_raises_the_reward_beyond_the_reward_free_control(pretrained_tiny_sd3_path, tmp_path):
    """Same seed, same pipeline: ORW-CFM with a reward that prefers images bright on the left ends
    well above the same run with uniform weights (online self-training alone also drifts)."""
    from accelerate.state import AcceleratorState

    from rewards_for_tests import left_bright

    def last_rounds_reward(**overrides) -> list[float]:
        AcceleratorState._reset_state(True)
        cfg = TrainConfig(**tiny_run_config(
            pretrained_tiny_sd3_path, str(tmp_path / "out"), num_epochs=15, learning_rate=3e-3, temperature=0.5,
            w2_coefficient=0.0, images_per_prompt=8, sample_batch_size=8, train_batch_size=4, rank=8,
            guidance_scale=1.0, num_sampling_steps=8, **overrides,
        ))  # fmt: skip
        trainer = Trainer(cfg, reward_fn=left_bright)
        return [trainer.run_round(r)["reward_mean"] for r in range(cfg.num_epochs)]

    weighted = last_rounds_reward()
    control = last_rounds_reward(weight_normalization="uniform")
    # left_bright is about +-6 per sample (the two modes); the round mean starts near 0.
    assert abs(weighted[0] - control[0]) < 1e-4  # round 0 samples the same untrained policy
    assert sum(weighted[-5:]) / 5 > 2.0, weighted
    assert sum(weighted[-5:]) / 5 > sum(control[-5:]) / 5 + 1.0, (weighted, control)


def test_script_writes_weights_config_and_metrics(tiny_sd3_path, tmp_path):
    out = tmp_path / "out"
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_config(tiny_sd3_path, str(out), num_epochs=2, log_sample_rewards=True)))
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(run), "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    required = {"epoch", "reward_mean", "reward_std", "reward_min", "reward_max", "fm_loss", "w2_loss", "ess",
                "lr", "grad_norm", "samples_seen", "seconds"}  # fmt: skip
    assert required <= set(rows[0])
    assert rows[1]["samples_seen"] == 16
    assert all(0 < r["ess"] <= 8 for r in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    weights = load_file(str(out / LORA_WEIGHTS_NAME))
    assert weights and all(k.startswith("transformer.") for k in weights)
    per_sample = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert len(per_sample) == 2 and len(per_sample[0]["weights"]) == 8
    assert sum(per_sample[0]["weights"]) == pytest.approx(8.0, rel=1e-5)


def _run(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("objective", ["orw_cfm_w2", "flow_grpo", "diffusion_nft"])
def test_two_processes_equal_one_process_with_double_batch(pretrained_tiny_sd3_path, tmp_path, objective):
    """accelerate launch with 2 real CPU processes (gloo), batch b each == 1 process with batch 2b, on the
    flow-matched tiny pipeline with guidance 2 and guided training (both CFG branches in the loss)."""
    common = dict(num_epochs=2, images_per_prompt=4, log_sample_rewards=True, learning_rate=1e-2,
                  weight_normalization="per_prompt", temperature=0.5)  # fmt: skip
    run = tmp_path / "run.yaml"
    one, two = tmp_path / "one", tmp_path / "two"
    values = for_objective(tiny_run_config(pretrained_tiny_sd3_path, str(one), **common), objective, sde_window_size=2)
    run.write_text(yaml.safe_dump(values))
    _run([python(), TRAIN_SCRIPT, "--config", str(run), "--sample_batch_size", "4", "--train_batch_size", "4"], tmp_path)
    accelerate = os.path.join(os.path.dirname(python()), "accelerate")
    _run(
        [accelerate, "launch", "--config_file", os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml"),
         TRAIN_SCRIPT, "--config", str(run), "--output_dir", str(two), "--sample_batch_size", "2",
         "--train_batch_size", "2"],
        tmp_path,
    )  # fmt: skip
    for name in (LORA_WEIGHTS_NAME, "config.yaml", "metrics.jsonl", "rewards.jsonl"):
        assert (two / name).exists(), name
    rows_one = [json.loads(x) for x in (one / "rewards.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "rewards.jsonl").read_text().splitlines()]
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        assert a["prompts"] == b["prompts"]
        torch.testing.assert_close(torch.tensor(a["rewards"]), torch.tensor(b["rewards"]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(a["weights"]), torch.tensor(b["weights"]), atol=1e-4, rtol=1e-4)
    lora_one, lora_two = load_file(str(one / LORA_WEIGHTS_NAME)), load_file(str(two / LORA_WEIGHTS_NAME))
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:
        torch.testing.assert_close(lora_one[key], lora_two[key], atol=1e-5, rtol=1e-4)
    assert any(v.abs().max() > 0 for k, v in lora_one.items() if "lora_B" in k)  # the adapter trained
    m_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in m_two] == [0, 1]


def test_a_config_silent_on_precision_takes_accelerates(tiny_sd3_path, tmp_path, monkeypatch, fresh_accelerate_state):
    """As under ``accelerate launch --mixed_precision bf16``: the run trains in bf16 (real autocast on CPU) and
    config.yaml records it, where the run config says nothing about precision."""
    from orw_diffusers import lora
    from rewards_for_tests import darkness

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    values = tiny_run_config(tiny_sd3_path, str(tmp_path / "out"), num_epochs=1, report_to="none")
    assert "mixed_precision" not in values
    trainer = Trainer(TrainConfig(**values), reward_fn=darkness)
    assert trainer.accelerator.mixed_precision == "bf16"
    model = trainer.unwrapped
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in lora.lora_parameters(model, None)} == {torch.float32}
    trainer.train()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["mixed_precision"] == "bf16"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
