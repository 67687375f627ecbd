"""Checkpoints: a run killed with SIGKILL and resumed ends bitwise where an uninterrupted run ends;
writes are atomic, rotation keeps the newest, and the config keys are checked."""

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, TEST_REWARDS, TRAIN_SCRIPT, for_objective, python, tiny_run_config
from orw_diffusers import checkpoint
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer

# A reward that hangs in its HANG_AT-th call (when the environment asks), after writing a marker
# file, so the test knows the process is inside that round and can kill it there.
HANGING_REWARD = textwrap.dedent(
    """
    import os
    import time

    calls = 0

    def brightness(images, prompts):
        global calls
        calls += 1
        if os.environ.get("ORW_TEST_HANG_AT") == str(calls):
            with open(os.environ["ORW_TEST_MARKER"], "w") as f:
                f.write(str(calls))
            time.sleep(600)
        return 100.0 * images.mean(dim=(1, 2, 3))
    """
)


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# The W2 budget (w2_target) adapts alpha every round and the judges keep the alarm's window: both are checkpointed.
ADAPTIVE = dict(w2_target=1e-4, w2_adapt_rate=0.5, eval_reward=f"{TEST_REWARDS}:darkness", hacking_window=2)


@pytest.mark.parametrize(
    "objective, extra",
    [("orw_cfm_w2", {}), ("flow_grpo", {}), ("diffusion_nft", {}), ("orw_cfm_w2", ADAPTIVE)],
    ids=["orw_cfm_w2", "flow_grpo", "diffusion_nft", "orw_cfm_w2-w2_target"],
)
def test_kill_during_round_3_then_resume_equals_an_uninterrupted_run(tiny_sd3_path, tmp_path, objective, extra):
    reward_file = tmp_path / "hanging_reward.py"
    reward_file.write_text(HANGING_REWARD)
    common = dict(
        num_epochs=4, checkpointing_steps=1, learning_rate=1e-2, lr_warmup_steps=3, log_sample_rewards=True,
        sampler_update_interval=2, sample_log_interval=1, validation_prompts=["a red cat"], validation_interval=2,
        reward=f"{reward_file}:brightness", **extra,
    )  # fmt: skip
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    values = for_objective(tiny_run_config(tiny_sd3_path, str(killed), **common), objective, sde_window_size=2)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(values))

    # Reward calls: 1 validation before training, 2-3 round 1, 4-5 round 2, 6 validation after 2 rounds,
    # 7-8 round 3 (8 samples per round in batches of 4). Hang in call 7.
    marker = tmp_path / "in_round_3"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", ORW_TEST_HANG_AT="7", ORW_TEST_MARKER=str(marker))
    proc = subprocess.Popen([python(), TRAIN_SCRIPT, "--config", str(run)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before round 3: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "round 3 never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert [r for r, _ in checkpoint.list_checkpoints(str(killed))] == [1, 2]
    assert [r["epoch"] for r in _rows(killed / "metrics.jsonl")] == [0, 1]
    assert not (killed / LORA_WEIGHTS_NAME).exists()

    # Resume (in-process, the hang is off here) and run the same config without interruption.
    resumed = Trainer(TrainConfig(**values, resume_from_checkpoint="latest"))
    assert resumed.start_round == 2
    resumed.train()
    Trainer(TrainConfig(**{**values, "output_dir": str(straight)})).train()

    _assert_same_tensors(load_file(str(killed / LORA_WEIGHTS_NAME)), load_file(str(straight / LORA_WEIGHTS_NAME)))
    trained = load_file(str(straight / LORA_WEIGHTS_NAME))
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # not a vacuous comparison
    # The last checkpoints match file by file: sampler adapter (which lags), optimizer and scheduler.
    last_k, last_s = killed / "checkpoints" / "checkpoint-000004", straight / "checkpoints" / "checkpoint-000004"
    sampler_file = os.path.join(checkpoint.SAMPLER_SUBDIR, LORA_WEIGHTS_NAME)
    _assert_same_tensors(load_file(str(last_k / sampler_file)), load_file(str(last_s / sampler_file)))
    opt_k, opt_s = (torch.load(d / "optimizer.bin", weights_only=True) for d in (last_k, last_s))
    assert opt_k["state"].keys() == opt_s["state"].keys()
    for key in opt_k["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_k["state"][key][name], opt_s["state"][key][name])
    assert torch.load(last_k / "scheduler.bin", weights_only=False) == torch.load(
        last_s / "scheduler.bin", weights_only=False
    )

    # metrics.jsonl: each round exactly once, with the same numbers as the uninterrupted run.
    rows_k, rows_s = _rows(killed / "metrics.jsonl"), _rows(straight / "metrics.jsonl")
    assert [r["epoch"] for r in rows_k] == [r["epoch"] for r in rows_s] == [0, 1, 2, 3]
    for a, b in zip(rows_k, rows_s):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    if "w2_target" in extra:  # alpha really moved, and the resumed rounds started from the checkpointed one
        assert len({r["w2_coefficient"] for r in rows_s}) == 4
        assert "eval/darkness_mean" in rows_k[3] and "hacking_alarm" in rows_k[3]
    assert [r["epoch"] for r in _rows(killed / "rewards.jsonl")] == [0, 1, 2, 3]
    assert [r["rounds_trained"] for r in _rows(killed / "samples" / "validation.jsonl")] == [0, 2, 4]


def _fake_checkpoint(root, name, complete=True):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        (path / checkpoint.STATE_NAME).write_text("{}")
    return str(path)


def test_interrupted_writes_are_never_latest_and_rotation_keeps_the_newest(tmp_path):
    assert checkpoint.resolve_resume("latest", str(tmp_path)) is None  # nothing yet: a fresh start
    one = _fake_checkpoint(tmp_path, "checkpoint-000001")
    two = _fake_checkpoint(tmp_path, "checkpoint-000002")
    _fake_checkpoint(tmp_path, ".tmp-checkpoint-000003")  # killed during its write, even after its state file
    _fake_checkpoint(tmp_path, "checkpoint-000004", complete=False)  # no state file: not a checkpoint
    assert checkpoint.latest_checkpoint(str(tmp_path)) == two
    assert checkpoint.resolve_resume("latest", str(tmp_path)) == two
    assert checkpoint.rotate(str(tmp_path), total_limit=5) == []
    assert checkpoint.rotate(str(tmp_path), total_limit=1) == [one]
    assert os.path.isdir(two) and not os.path.exists(one)
    checkpoint.remove_temporaries(str(tmp_path))
    assert not (tmp_path / "checkpoints" / ".tmp-checkpoint-000003").exists()


def test_checkpoint_holds_both_adapters_and_states_not_the_frozen_model(tiny_sd3_path, tmp_path):
    values = tiny_run_config(tiny_sd3_path, str(tmp_path / "out"), num_epochs=3, checkpointing_steps=1,
                             checkpoints_total_limit=2, sampler_update_interval=2, report_to="none")  # fmt: skip
    cfg = TrainConfig(**values)
    trainer = Trainer(cfg)
    trainer.train()
    found = checkpoint.list_checkpoints(cfg.output_dir)
    assert [r for r, _ in found] == [2, 3]  # rotation: the oldest went, the newest stayed
    last = found[-1][1]
    files = sorted(os.path.relpath(os.path.join(d, f), last) for d, _, fs in os.walk(last) for f in fs)
    assert files == sorted([
        LORA_WEIGHTS_NAME, os.path.join("sampler", LORA_WEIGHTS_NAME), "trainer_state.json",
        "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
    ])  # fmt: skip
    state = checkpoint.read_state(last)
    assert (state.rounds_done, state.prompt_cursor, state.samples_seen) == (3, 6, 24)
    trained = load_file(os.path.join(last, LORA_WEIGHTS_NAME))
    assert trained and all(k.startswith("transformer.") for k in trained)
    _assert_same_tensors(trained, load_file(os.path.join(cfg.output_dir, LORA_WEIGHTS_NAME)))
    # sampler_update_interval=2: after round 3 the sampler still holds round 2's weights
    sampler = load_file(os.path.join(last, "sampler", LORA_WEIGHTS_NAME))
    assert sampler.keys() == trained.keys() and any(not torch.equal(sampler[k], trained[k]) for k in trained)

    # A save that dies half-way leaves a temporary that is neither latest nor kept by the next save.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    trainer.family.save_lora_weights = crash
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(trainer.accelerator, cfg.output_dir, 4, total_limit=2)
    assert (tmp_path / "out" / "checkpoints" / ".tmp-checkpoint-000004").is_dir()
    assert checkpoint.latest_checkpoint(cfg.output_dir) == last
    del trainer.family.save_lora_weights
    checkpoint.save_checkpoint(trainer.accelerator, cfg.output_dir, 4, total_limit=2)
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["checkpoint-000003", "checkpoint-000004"]


def test_a_round_draws_nothing_from_the_global_rng(tiny_sd3_path, tmp_path):
    """What makes a resume bitwise: all randomness comes from per-sample generators."""
    trainer = Trainer(TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path / "out"), report_to="none")))
    state = torch.get_rng_state()
    trainer.run_round(0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(checkpointing_steps=-1), "checkpointing_steps"),
        (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
        (dict(resume_from_checkpoint="/nonexistent/checkpoint-000002"), "resume_from_checkpoint"),
    ],
)
def test_bad_checkpoint_keys_are_one_line_errors(tiny_sd3_path, tmp_path, overrides, match):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), **overrides))
    with pytest.raises(ConfigError, match=match) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def test_resume_keys_accept_a_checkpoint_and_a_fresh_run_refuses_old_checkpoints(tiny_sd3_path, tmp_path):
    path = _fake_checkpoint(tmp_path, "checkpoint-000002")
    validate(TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), resume_from_checkpoint=path)))
    validate(TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), resume_from_checkpoint="latest")))
    with pytest.raises(ConfigError, match="checkpoints of an earlier run"):
        validate(TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path))))
