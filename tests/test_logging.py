"""Logging of long runs: sample and validation grids, TensorBoard events, the diversity metric,
per-prompt rewards, the summary line, and the checks of the logging keys."""

import glob
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from conftest import tiny_run_config
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.images import image_grid, mean_pairwise_distance
from orw_diffusers.trainer import Trainer


def _trainer(tiny_sd3_path, tmp_path, reward_fn=None, **overrides) -> Trainer:
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path / "out"), **overrides))
    return Trainer(cfg, reward_fn=reward_fn)


def test_mean_pairwise_distance_closed_form():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 3, 4
    assert mean_pairwise_distance(points).item() == pytest.approx(4.0)
    assert mean_pairwise_distance(points[:1]).item() == 0.0
    assert mean_pairwise_distance(torch.ones(5, 2, 3, 3)).item() == 0.0  # flattened; identical rows


def test_grid_layout_enlarges_small_tiles_and_checks_captions():
    images = torch.rand(5, 3, 16, 16)
    grid = image_grid(images, ncols=2, captions=[str(i) for i in range(5)], min_tile=64, pad=2)
    # 16 px tiles x4 -> 64; 2 columns, 3 rows of 64 px tile + 14 px caption
    assert grid.size == (2 * 66 + 2, 3 * (64 + 14 + 2) + 2)
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, ncols=2, captions=["only one"])


def test_grid_row_labels_sit_in_a_left_margin_one_per_row():
    import numpy as np

    images = torch.zeros(4, 3, 16, 16)  # black tiles
    plain = image_grid(images, ncols=2, min_tile=64, pad=2)
    labelled = image_grid(images, ncols=2, min_tile=64, pad=2, row_labels=["base", "fine-tuned"])
    margin = labelled.size[0] - plain.size[0]
    assert margin > 20 and labelled.size[1] == plain.size[1]
    pixels = np.asarray(labelled)
    assert (pixels[:, margin:] == np.asarray(plain)).all()  # the tiles moved right, unchanged
    for top in (2, 2 + 66):  # each row's label is drawn beside that row
        assert (pixels[top : top + 64, :margin] < 128).any(), top
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        image_grid(torch.zeros(5, 3, 16, 16), ncols=2, row_labels=["a", "b"])


def test_demo_before_after_grid_labels_base_and_fine_tuned_rows(monkeypatch):
    from orw_diffusers import demo, images as images_module

    calls = []
    grid_fn = images_module.image_grid
    monkeypatch.setattr(images_module, "image_grid", lambda *a, **kw: calls.append(kw) or grid_fn(*a, **kw))
    before, after = torch.zeros(40, 3, 16, 16), torch.ones(40, 3, 16, 16)
    grid = demo.before_after_grid(before, after)
    assert calls[-1]["row_labels"] == ["base", "base", "fine-tuned", "fine-tuned"] and calls[-1]["ncols"] == 16
    assert grid.size[1] == 4 * 66 + 2  # 16 px digits shown as 64 px tiles
    demo.before_after_grid(before[:5], after[:5])
    assert calls[-1]["row_labels"] == ["base", "fine-tuned"] and calls[-1]["ncols"] == 5


def test_reward_band_stays_inside_the_observed_range():
    from orw_diffusers.images import reward_band

    rows = [
        {"epoch": 0, "reward_mean": 0.9, "reward_std": 0.3, "reward_min": 0.2, "reward_max": 1.0},
        {"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1, "reward_min": 0.0, "reward_max": 1.0},
        {"epoch": 2, "reward_mean": 0.1, "reward_std": 0.4, "reward_min": 0.0, "reward_max": 0.7},
    ]
    low, high = reward_band(rows)
    assert low.tolist() == pytest.approx([0.6, 0.4, 0.0])
    assert high.tolist() == pytest.approx([1.0, 0.6, 0.5])
    unclipped = reward_band([{k: v for k, v in r.items() if k not in ("reward_min", "reward_max")} for r in rows])
    assert unclipped[1].tolist() == pytest.approx([1.2, 0.6, 0.5])  # without min/max: the plain ± std
    assert reward_band([{"epoch": 0, "reward_mean": 1.0}]) is None


def test_plot_curves_draws_the_clipped_band(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from orw_diffusers.images import plot_curves

    bands = []
    fill_between = Axes.fill_between
    def recording(ax, x, y1, y2, **kwargs):
        bands.append((y1, y2))
        return fill_between(ax, x, y1, y2, **kwargs)

    monkeypatch.setattr(Axes, "fill_between", recording)
    rows = [{"epoch": i, "reward_mean": m, "reward_std": 0.5, "reward_min": 0.0, "reward_max": 1.0, "w2_loss": 0.1}
            for i, m in enumerate([0.2, 0.8])]  # fmt: skip
    assert plot_curves(rows, str(tmp_path / "curves.png")) == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    ((low, high),) = bands
    assert low.tolist() == pytest.approx([0.0, 0.3]) and high.tolist() == pytest.approx([0.7, 1.0])


def test_sample_grid_puts_one_prompt_per_labelled_row(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from orw_diffusers import run_log

    drawn = {}
    def recording(images, **kwargs):
        drawn.update(kwargs, images=images)
        return Image.new("RGB", (4, 4))

    monkeypatch.setattr(run_log, "image_grid", recording)
    cfg = SimpleNamespace(output_dir=str(tmp_path), sample_log_interval=1)
    log = run_log.RunLog(cfg, SimpleNamespace(is_main_process=True, trackers=[]), {"a cat": 0, "a dog": 1})
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2) / 10  # sample i is grey level i / 10
    log.sample_grid(0, images, ["a cat", "a dog"] * 3, torch.arange(6.0))  # samples alternate between prompts
    assert drawn["ncols"] == 3 and drawn["row_labels"] == ["p0", "p1"]
    assert drawn["captions"] == ["p0 r=0", "p0 r=2", "p0 r=4", "p1 r=1", "p1 r=3", "p1 r=5"]
    assert drawn["images"][:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.1, 0.3, 0.5])


def _events(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = {os.path.dirname(p) for p in glob.glob(os.path.join(output_dir, "logs", "orw-cfm-w2", "events.*"))}
    acc = EventAccumulator(logdir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_grids_validation_and_tensorboard(tiny_sd3_path, tmp_path, capsys):
    trainer = _trainer(tiny_sd3_path, tmp_path, num_epochs=2, report_to="tensorboard", sample_log_interval=1,
                       validation_prompts=["a red cat", "a dark dog", "a blue cat"], validation_interval=1,
                       learning_rate=1e-2)  # fmt: skip
    before = trainer.rollouts.validate(0)
    assert torch.equal(before, trainer.rollouts.validate(0))  # fixed noise: the same render every time
    trainer.train()
    out = trainer.cfg.output_dir
    samples = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "samples", "*.png")))
    assert samples == ["round_0000.png", "round_0001.png", "validation_0000.png", "validation_0001.png",
                       "validation_0002.png"]  # fmt: skip
    rows = [json.loads(x) for x in open(os.path.join(out, "samples", "validation.jsonl"))]
    assert [r["rounds_trained"] for r in rows] == [0, 1, 2]  # the two manual renders were cut at train start
    assert rows[0]["rewards"] == before.tolist()
    assert rows[2]["rewards"] != rows[0]["rewards"]  # the policy moved: same noise, different images
    with Image.open(os.path.join(out, "samples", "round_0000.png")) as im:
        assert im.size[0] > 3 * 96  # 8 samples, 3 per row, enlarged to 96 px tiles

    events = _events(out)
    assert {"samples", "validation"} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    assert {"reward_mean", "w2_loss", "diversity", "reward_by_prompt/0", "reward_by_prompt/1",
            "validation/reward_mean"} <= scalars  # fmt: skip
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1]
    assert [e.step for e in events.Scalars("validation/reward_mean")] == [0, 1, 2]

    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("done: 2 rounds, 16 samples.") and f"load_lora_weights({out!r})" in line


def test_progress_in_a_log_file_is_a_few_lines_not_one_per_update(tiny_sd3_path, tmp_path, capsys):
    """Not on a terminal (capsys, like a job log): no inner bars, and the rounds bar prints at most one line
    every FILE_INTERVAL_S (here its first and its last); the numbers are in metrics.jsonl."""
    import re
    import time

    from orw_diffusers.progress import FILE_INTERVAL_S

    trainer = _trainer(tiny_sd3_path, tmp_path, num_epochs=6, num_inner_epochs=2, report_to="none",
                       sample_log_interval=0)  # fmt: skip
    start = time.monotonic()
    trainer.train()
    intervals = int((time.monotonic() - start) // FILE_INTERVAL_S)  # 0 unless the machine is very slow
    err = capsys.readouterr().err
    lines = [x for x in re.split(r"[\r\n]+", err) if re.search(r"rounds|sampling|optimising", x)]
    assert FILE_INTERVAL_S >= 30 and 1 <= len(lines) <= 2 + intervals, lines  # unthrottled: a line per update
    assert all(x.startswith("rounds") for x in lines)
    assert len(open(os.path.join(tmp_path, "out", "metrics.jsonl")).readlines()) == 6


class EmbeddingReward:
    """Brightness, plus an ``embed`` (the per-channel means) that the diversity metric should use."""

    def __init__(self):
        self.embedded = []

    def __call__(self, images, prompts):
        return 100.0 * images.mean(dim=(1, 2, 3))

    def embed(self, images):
        features = images.mean(dim=(2, 3))  # [B, 3]
        self.embedded.append(features)
        return features


def test_diversity_in_the_reward_embedding_else_in_latent_space(tiny_sd3_path, tmp_path):
    reward = EmbeddingReward()
    trainer = _trainer(tiny_sd3_path, tmp_path / "a", reward_fn=reward, report_to="none")
    metrics = trainer.run_round(0)
    expected = mean_pairwise_distance(torch.cat(reward.embedded))
    assert len(torch.cat(reward.embedded)) == 8
    assert metrics["diversity"] == pytest.approx(expected.item(), rel=1e-6)

    from rewards_for_tests import brightness

    trainer = _trainer(tiny_sd3_path, tmp_path / "b", reward_fn=brightness, report_to="none")
    latents = trainer.rollout(0).latents  # the same round-0 samples that run_round draws
    metrics = trainer.run_round(0)
    assert metrics["diversity"] == pytest.approx(mean_pairwise_distance(latents).item(), rel=1e-6)
    assert metrics["diversity"] != pytest.approx(expected.item(), rel=1e-3)


def test_reward_by_prompt_is_the_mean_of_each_prompts_samples(tiny_sd3_path, tmp_path):
    trainer = _trainer(tiny_sd3_path, tmp_path, num_epochs=1, log_sample_rewards=True, report_to="none",
                       prompts=["a red cat", "a blue dog", "a red cat", "a dark cat"], images_per_prompt=2)  # fmt: skip
    metrics = trainer.train()
    out = trainer.cfg.output_dir
    prompts = open(os.path.join(out, "prompts.txt")).read().splitlines()
    assert prompts == ["a red cat", "a blue dog", "a dark cat"]  # unique, in order: the <i> of the keys
    (row,) = [json.loads(x) for x in open(os.path.join(out, "rewards.jsonl"))]
    for i, prompt in enumerate(prompts):
        rewards = [r for p, r in zip(row["prompts"], row["rewards"]) if p == prompt]
        assert metrics[f"reward_by_prompt/{i}"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)

    few = _trainer(tiny_sd3_path, tmp_path / "few", per_prompt_log_max=1, report_to="none").run_round(0)
    assert not any(k.startswith("reward_by_prompt/") for k in few)


def test_default_tracker_is_tensorboard_and_wandb_is_optional(tiny_sd3_path, tmp_path):
    assert TrainConfig().report_to == "tensorboard"
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the missing-package message cannot be checked")
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), report_to="wandb"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sample_log_interval=-1), "sample_log_interval"),
        (dict(validation_interval=0), "validation_interval"),
        (dict(validation_prompts=["a cat", " "]), "validation_prompts"),
        (dict(per_prompt_log_max=-2), "per_prompt_log_max"),
    ],
)
def test_bad_logging_keys_are_one_line_errors(tiny_sd3_path, tmp_path, overrides, match):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), **overrides))
    with pytest.raises(ConfigError, match=match) as info:
        validate(cfg)
    assert "\n" not in str(info.value)
