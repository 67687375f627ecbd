"""Staying close to the base: the W2 budget's controller, held-out judges (eval_reward), drift signals and
the reward-hacking alarm."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_REWARDS, tiny_run_config
from orw_diffusers import control
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.errors import ConfigError
from orw_diffusers.objectives import build_objective
from orw_diffusers.trainer import Trainer

# --- the controller (pure) ------------------------------------------------------------------------


def test_controller_raises_alpha_above_the_target_and_lowers_it_below():
    assert control.adapt_coefficient(1.0, 2.0, 1.0, 0.1, 1e-3, 10.0) == pytest.approx(math.exp(0.1 * math.log(2.0)))
    assert control.adapt_coefficient(1.0, 0.5, 1.0, 0.1, 1e-3, 10.0) == pytest.approx(math.exp(-0.1 * math.log(2.0)))
    assert control.adapt_coefficient(0.3, 1.0, 1.0, 0.1, 1e-3, 10.0) == 0.3  # on target: unchanged


def test_controller_step_is_bounded_and_alpha_clamped():
    # far above / below the target (or W2 = 0, a policy still equal to the base): one factor exp(rate)
    assert control.adapt_coefficient(1.0, 1e6, 1.0, 0.1, 1e-3, 10.0) == pytest.approx(math.exp(0.1))
    assert control.adapt_coefficient(1.0, 1e-9, 1.0, 0.1, 1e-3, 10.0) == pytest.approx(math.exp(-0.1))
    assert control.adapt_coefficient(1.0, 0.0, 1.0, 0.1, 1e-3, 10.0) == pytest.approx(math.exp(-0.1))
    assert control.adapt_coefficient(9.9, 1e6, 1.0, 0.5, 1e-3, 10.0) == 10.0
    assert control.adapt_coefficient(0.0011, 0.0, 1.0, 0.5, 1e-3, 10.0) == 1e-3


def test_window_change_is_the_least_squares_change():
    assert control.window_change([1.0, 2.0, 3.0, 4.0]) == pytest.approx(3.0)
    assert control.window_change([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.6)  # slope 0.2 over 3 steps
    assert control.window_change([5.0]) == 0.0


def test_alarm_fires_on_rising_train_falling_eval_only_when_the_window_is_full():
    train = [0.1 * i for i in range(10)]
    falling = {"judge": [1.0 - 0.05 * i for i in range(10)]}
    assert control.hacking_alarm(train, falling, window=10, min_rise=0.2, min_drop=0.2) == "judge"
    assert control.hacking_alarm(train[:9], {"judge": falling["judge"][:9]}, 10, 0.2, 0.2) is None  # not yet full
    rising = {"judge": [0.5 + 0.05 * i for i in range(10)]}
    assert control.hacking_alarm(train, rising, 10, 0.2, 0.2) is None  # both rise: no alarm
    flat_train = [0.5] * 10
    assert control.hacking_alarm(flat_train, falling, 10, 0.2, 0.2) is None  # the reward did not rise
    small = {"judge": [1.0 - 0.01 * i for i in range(10)]}  # fell by 0.09 < min_drop
    assert control.hacking_alarm(train, small, 10, 0.2, 0.2) is None
    # only the last window counts: an old fall followed by a recovery is no alarm
    recovered = {"judge": [1.0 - 0.1 * i for i in range(10)] + [0.1 + 0.1 * i for i in range(10)]}
    assert control.hacking_alarm(train + [1.0 + 0.1 * i for i in range(10)], recovered, 10, 0.2, 0.2) is None


# --- the objective's seam ---------------------------------------------------------------------------


def _cfg(path, tmp_path, **overrides):
    return TrainConfig(**tiny_run_config(path, str(tmp_path / "out"), **overrides))


def test_orw_end_round_logs_alpha_and_adapts_it_only_with_a_target(tiny_sd3_path, tmp_path):
    fixed = build_objective(_cfg(tiny_sd3_path, tmp_path, w2_coefficient=0.3))
    assert fixed.end_round({"w2_loss": 5.0}) == {"w2_coefficient": 0.3}
    assert fixed.w2_coefficient == 0.3
    budget = build_objective(_cfg(tiny_sd3_path, tmp_path, w2_coefficient=0.3, w2_target=1.0, w2_adapt_rate=0.2))
    assert budget.end_round({"w2_loss": 5.0}) == {"w2_coefficient": 0.3}  # the alpha this round trained with
    assert budget.w2_coefficient == pytest.approx(0.3 * math.exp(0.2))
    state = budget.state_dict()
    restored = build_objective(_cfg(tiny_sd3_path, tmp_path, w2_coefficient=0.3, w2_target=1.0))
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.w2_coefficient == budget.w2_coefficient


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(w2_target=0.0), "w2_target"),
        (dict(w2_target=1.0, w2_coefficient_min=0.0), "w2_coefficient_min"),
        (dict(w2_target=1.0, w2_coefficient=1000.0), "w2_coefficient"),
        (dict(w2_target=1.0, w2_adapt_rate=2.0), "w2_adapt_rate"),
        (dict(eval_reward="no_such_reward"), "eval_reward: unknown reward 'no_such_reward'"),
        (dict(hacking_window=1), "hacking_window"),
        (dict(hacking_min_drop=-1.0), "hacking_min_drop"),
        (dict(stop_on_reward_hacking=True), "stop_on_reward_hacking"),
    ],
)
def test_bad_guard_keys_are_one_line_errors(tiny_sd3_path, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(tiny_sd3_path, tmp_path, **overrides))


def test_w2_budget_keys_belong_to_orw():
    from orw_diffusers.config import from_dict

    with pytest.raises(ConfigError, match="w2_target: belongs to objective 'orw_cfm_w2'"):
        from_dict({"objective": "flow_grpo", "w2_target": 0.1})


# --- held-out judges in a run -----------------------------------------------------------------------

GRAD_PROBE = []


def grad_probe(images, prompts):
    """An eval reward that records whether it could take part in a gradient."""
    GRAD_PROBE.append((torch.is_grad_enabled(), images.requires_grad))
    return images.mean(dim=(1, 2, 3))


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_eval_reward_is_logged_and_never_reaches_the_training_signal(tiny_sd3_path, tmp_path):
    common = dict(num_epochs=2, log_sample_rewards=True, sample_log_interval=0, validation_prompts=["a red cat"],
                  validation_interval=1, report_to="none")  # fmt: skip
    plain = tmp_path / "plain"
    Trainer(TrainConfig(**tiny_run_config(tiny_sd3_path, str(plain), **common))).train()
    GRAD_PROBE.clear()
    judged = tmp_path / "judged"
    eval_reward = [{"name": "test_guard:grad_probe"}, {"name": f"{TEST_REWARDS}:darkness"}]
    Trainer(TrainConfig(**tiny_run_config(tiny_sd3_path, str(judged), eval_reward=eval_reward, **common))).train()

    assert GRAD_PROBE and not any(enabled or requires for enabled, requires in GRAD_PROBE)  # never under grad
    # The training signal and the trained weights are bitwise those of the run without judges.
    signal_a, signal_b = (_rows(d / "rewards.jsonl") for d in (plain, judged))
    assert [r["weights"] for r in signal_a] == [r["weights"] for r in signal_b]
    a, b = load_file(str(plain / LORA_WEIGHTS_NAME)), load_file(str(judged / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = _rows(plain / "metrics.jsonl"), _rows(judged / "metrics.jsonl")
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {
            k: v for k, v in rb.items() if k != "seconds" and not k.startswith("eval/") and k != "hacking_alarm"
        }
        assert rb["eval/darkness_mean"] == pytest.approx(-rb["reward_mean"], rel=1e-5)  # darkness = -brightness
        assert "eval/grad_probe_mean" in rb and rb["hacking_alarm"] == 0.0
        assert rb["w2_coefficient"] == 0.1 and rb["latent_rms"] > 0 and rb["velocity_rms_ref"] > 0
    validation = _rows(judged / "samples" / "validation.jsonl")
    assert [sorted(r["eval"]) for r in validation] == [["darkness", "grad_probe"]] * 3


def test_w2_target_moves_alpha_every_round(tiny_sd3_path, tmp_path):
    cfg = _cfg(tiny_sd3_path, tmp_path, num_epochs=3, w2_coefficient=0.5, w2_target=1e3, w2_adapt_rate=0.3,
               report_to="none", sample_log_interval=0)  # fmt: skip
    Trainer(cfg).train()
    rows = _rows(tmp_path / "out" / "metrics.jsonl")
    # w2_loss is far below a large target: alpha falls by the largest step, exp(-0.3), every round
    assert all(r["w2_loss"] < 1e3 / math.e for r in rows)
    assert [r["w2_coefficient"] for r in rows] == pytest.approx([0.5 * math.exp(-0.3 * i) for i in range(3)])
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| `w2_target` (W2 budget) / alpha in the last round | 1000 / {rows[-1]['w2_coefficient']:.4g} |" in card
    assert "hacking" not in card  # no judges, no alarm row


CALLS = {"rising": 0, "falling": 0}


def rising(images, prompts):
    """A training reward that rises every call, whatever the images."""
    CALLS["rising"] += 1
    return torch.full((len(images),), float(CALLS["rising"]))


def falling(images, prompts):
    """A judge that falls every call, whatever the images: with ``rising``, the alarm must fire."""
    CALLS["falling"] += 1
    return torch.full((len(images),), -float(CALLS["falling"]))


def test_alarm_warns_once_and_stops_the_run_cleanly(tiny_sd3_path, tmp_path, caplog):
    CALLS.update(rising=0, falling=0)
    cfg = _cfg(tiny_sd3_path, tmp_path, num_epochs=8, reward="test_guard:rising", eval_reward="test_guard:falling",
               hacking_window=3, hacking_min_rise=0.5, hacking_min_drop=0.5, stop_on_reward_hacking=True,
               report_to="none", sample_log_interval=0, checkpointing_steps=2)  # fmt: skip
    with caplog.at_level("WARNING", logger="orw_diffusers.judges"):
        Trainer(cfg).train()
    out = tmp_path / "out"
    rows = _rows(out / "metrics.jsonl")
    assert [r["hacking_alarm"] for r in rows] == [0.0, 0.0, 1.0]  # the window of 3 is full in round 2
    warnings = [r.message for r in caplog.records if "reward-hacking alarm" in r.message]
    assert len(warnings) == 1 and "round 2" in warnings[0] and "rounds 0-2" in warnings[0]
    assert (out / LORA_WEIGHTS_NAME).exists() and (out / "README.md").exists()
    assert (out / "checkpoints" / "checkpoint-000003").is_dir()  # a checkpoint to continue from
    card = (out / "README.md").read_text()
    assert "| reward-hacking alarm | raised in round 2, the run stopped there |" in card
    assert "| held-out `falling` (eval_reward), first → last round | -1.5 → -5.5 |" in card  # 2 calls per round


def test_digit_judge_reward_is_the_demos_svc():
    pytest.importorskip("sklearn")
    from orw_diffusers.digits.data import load_digit_images
    from orw_diffusers.digits.judge import judge_probs
    from orw_diffusers.rewards import build_reward

    images, labels = load_digit_images("heldout")
    images, labels = images[:40], labels[:40]
    out = build_reward("digit_judge_even")(images, [""] * len(images))
    expected = judge_probs(images)[:, 0::2].sum(-1).float()
    assert torch.allclose(out.components["digit_judge_even"], expected)
    assert ((out.rewards > 0.5) == (labels % 2 == 0)).float().mean() > 0.9  # it reads real digits
    small = torch.nn.functional.avg_pool2d(images, 2)  # 8 x 8 pixel-base images are resized for the judge
    assert build_reward([{"name": "digit_judge_in", "kwargs": {"digits": [1]}}])(small, [""] * 40).rewards.shape == (40,)


def test_memory_planner_counts_the_judges_beside_the_reward(tiny_sd3_path, tmp_path):
    from orw_diffusers.memory import PlanSettings

    cfg = _cfg(tiny_sd3_path, tmp_path, reward="jpeg_compressibility", eval_reward={"pickscore": 1.0})
    assert PlanSettings.from_train_config(cfg).rewards == ("jpeg_compressibility", "pickscore")
    cfg = _cfg(tiny_sd3_path, tmp_path, reward="jpeg_compressibility")
    assert PlanSettings.from_train_config(cfg).rewards == ("jpeg_compressibility",)
