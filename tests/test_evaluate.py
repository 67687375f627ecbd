"""The evaluation report: same seeds for base and fine-tuned, the tables, the grid and the curves."""

import json

import pytest
from PIL import Image

from conftest import TEST_REWARDS, tiny_run_config
from orw_diffusers import evaluate
from orw_diffusers.config import TrainConfig
from orw_diffusers.flow import sample_generator
from orw_diffusers.trainer import Trainer

PROMPTS = ["a red cat", "a blue dog"]


def _argv(base, lora, out, *extra):
    return ["--base", base, "--lora", str(lora), "--prompts", *PROMPTS, "--reward", f"{TEST_REWARDS}:brightness",
            "--num_images_per_prompt", "2", "--seed", "5", "--output_dir", str(out), "--num_inference_steps", "4",
            "--guidance_scale", "2.0", "--resolution", "16", "--max_sequence_length", "8", *extra]  # fmt: skip


def test_report_of_a_trained_lora(tiny_sd3_path, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from rewards_for_tests import brightness

    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path / "run"), num_epochs=2, learning_rate=1e-2,
                                        report_to="none", sample_log_interval=0,
                                        eval_reward=f"{TEST_REWARDS}:darkness"))  # fmt: skip
    Trainer(cfg).train()
    out = tmp_path / "eval"
    assert evaluate.main(_argv(tiny_sd3_path, cfg.output_dir, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == {"grid": "comparison.png", "curves": "curves.png"}
    for name in ("comparison.png", "curves.png", "report.md"):
        assert (out / name).is_file(), name
    with Image.open(out / "comparison.png") as grid:  # per prompt, a base row above a fine-tuned row of 2 tiles
        width, height = grid.size
        assert height == 4 * (96 + 14 + 2) + 2 and width > 2 * 98 + 2  # the rows' labels in a left margin
        labels = grid.crop((0, 0, width - (2 * 98 + 2), height)).convert("L")
        assert labels.getextrema()[0] < 128  # the margin holds text

    # The base side is exactly the plain pipeline with generator (seed, prompt i, image j).
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(PROMPTS):
        images = pipe(prompt=prompt, num_images_per_prompt=2, generator=[sample_generator(5, i, j) for j in range(2)],
                      num_inference_steps=4, guidance_scale=2.0, height=16, width=16, max_sequence_length=8,
                      output_type="pt").images  # fmt: skip
        assert report["per_prompt"][i]["base"] == pytest.approx(
            brightness(images, [prompt] * 2).mean().item(), rel=1e-5
        )
    stats = report["rewards"]["brightness"]
    assert stats["base"]["mean"] == pytest.approx(sum(r["base"] for r in report["per_prompt"]) / 2, rel=1e-5)
    assert stats["tuned"]["mean"] != pytest.approx(stats["base"]["mean"], abs=1e-4)  # the LoRA was applied
    assert report["diversity"]["space"] == "pixels" and report["diversity"]["base"] > 0
    printed = capsys.readouterr().out
    assert "| reward `brightness` |" in printed and "| 1 | a blue dog |" in printed
    # the run's eval_reward (its config.yaml) is judged apart: darkness = -brightness on the same images
    held_out = report["held_out"]["darkness"]
    assert held_out["tuned"]["mean"] == pytest.approx(-stats["tuned"]["mean"], rel=1e-5)
    assert "| held-out `darkness` |" in printed
    assert "darkness" not in report["rewards"]


def test_an_untrained_lora_reproduces_the_base_images_exactly(tiny_sd3_path, tmp_path):
    """The fresh adapter is zero, so identical numbers prove base and fine-tuned use the same seeds."""
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path / "zero"), report_to="none"))
    Trainer(cfg).save(cfg.output_dir)
    out = tmp_path / "eval"
    assert evaluate.main(_argv(tiny_sd3_path, cfg.output_dir, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(row["base"] == row["tuned"] for row in report["per_prompt"])
    assert report["diversity"]["base"] == report["diversity"]["tuned"]
    assert report["files"]["curves"] is None and not (out / "curves.png").exists()  # no metrics.jsonl there


@pytest.mark.parametrize(
    "bad, match",
    [
        (["--lora", "/nonexistent/run"], "--lora"),
        (["--reward", "no_such_reward"], "unknown reward"),
        (["--num_images_per_prompt", "0"], "--num_images_per_prompt"),
        (["--eval_reward", "no_such_judge"], "--eval_reward: unknown reward 'no_such_judge'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_sd3_path, tmp_path, capsys, bad, match):
    argv = _argv(tiny_sd3_path, tmp_path, tmp_path / "eval")
    for flag, value in zip(bad[::2], bad[1::2]):
        if flag not in argv:
            argv += [flag, value]
        argv[argv.index(flag) + 1] = value
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
