"""Model card and Hub upload, offline: the HfApi is a fake that records its calls."""

import os
from types import SimpleNamespace

import pytest

from conftest import tiny_run_config
from orw_diffusers import hub, push
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.checkpoint import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer

TOKEN = "hf_sentinel_token_that_must_never_appear"


class FakeApi:
    """Records create_repo/upload_folder; checks at upload time which files are already on disk."""

    def __init__(self, fail_upload: bool = False):
        self.calls = []
        self.fail_upload = fail_upload

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        on_disk = sorted(p for p in allow_patterns if os.path.isfile(os.path.join(folder_path, p)))
        self.calls.append(("upload_folder", repo_id, folder_path, sorted(allow_patterns), on_disk))
        if self.fail_upload:
            raise ConnectionError("Max retries exceeded with url: /api/repos/create")
        return SimpleNamespace(commit_url="https://huggingface.co/fake/commit/1")


def _train(tiny_sd3_path, out, api, **overrides):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(out), num_epochs=1, report_to="none",
                                        sample_log_interval=1, push_to_hub=True, **overrides))  # fmt: skip
    validate(cfg)
    trainer = Trainer(cfg, hub_api=api)
    return trainer, cfg


def test_training_pushes_weights_card_config_metrics_and_grid(tiny_sd3_path, tmp_path, capsys):
    from huggingface_hub import ModelCard

    api = FakeApi()
    trainer, cfg = _train(tiny_sd3_path, tmp_path / "out", api, hub_model_id="tiny-orw", hub_private=True)
    trainer.train()
    expected = sorted([LORA_WEIGHTS_NAME, "README.md", "config.yaml", "metrics.jsonl", "samples/round_0000.png"])
    assert api.calls == [
        ("create_repo", "tiny-orw", True, True),
        ("upload_folder", "me/tiny-orw", cfg.output_dir, expected, expected),  # all written before the upload
    ]
    card = ModelCard.load(os.path.join(cfg.output_dir, "README.md"))
    assert card.data.library_name == "diffusers"
    assert {"diffusers", "lora", "orw-cfm-w2"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local base model is named in the text, not in the metadata
    text = card.text
    for needle in ('pipe.load_lora_weights("tiny-orw")', "![samples](samples/round_0000.png)", "| rounds | 1 |",
                   "| samples seen | 8 |", "| `w2_coefficient` (alpha) | 0.1 |", "| `temperature` (tau) | 1 |",
                   "rewards_for_tests.py:brightness", "diversity, last round"):  # fmt: skip
        assert needle in text, needle
    assert "on the Hub as me/tiny-orw" in capsys.readouterr().out


def test_failed_upload_keeps_files_and_prints_the_retry_command(tiny_sd3_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    trainer, cfg = _train(tiny_sd3_path, out, FakeApi(fail_upload=True), hub_model_id="me/orw-lora")
    with pytest.raises(hub.HubUploadError) as info:
        trainer.train()
    retry = f"python -m orw_diffusers.push {out} --hub_model_id me/orw-lora"
    assert str(info.value).endswith(retry) and "ConnectionError" in str(info.value)
    captured = capsys.readouterr()
    assert retry in captured.err
    for name in (LORA_WEIGHTS_NAME, "README.md", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name

    # The retry command, failing again and then succeeding.
    assert push.main([str(out), "--hub_model_id", "me/orw-lora"], api=FakeApi(fail_upload=True)) == 3
    assert retry in capsys.readouterr().err
    api = FakeApi()
    assert push.main([str(out), "--hub_model_id", "me/other-name", "--private"], api=api) == 0
    assert api.calls[0] == ("create_repo", "me/other-name", True, True)
    assert api.calls[1][1:3] == ("me/other-name", str(out))
    assert 'load_lora_weights("me/other-name")' in (out / "README.md").read_text()  # card follows the repo
    captured = capsys.readouterr()
    assert "https://huggingface.co/me/other-name" in captured.out
    every_file = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    texts = [open(p, errors="ignore").read() for p in every_file if p.endswith((".md", ".yaml", ".jsonl", ".json"))]
    assert not any(TOKEN in t for t in texts + [captured.out, captured.err, str(info.value)])


def test_push_refuses_a_directory_without_weights(tmp_path, capsys):
    assert push.main([str(tmp_path), "--hub_model_id", "me/x"], api=FakeApi()) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_card_names_a_hub_base_model_in_its_metadata(tmp_path):
    summary = hub.RunSummary(
        base_model="stabilityai/stable-diffusion-3.5-medium", reward={"clip_score": 1.0, "aesthetic": 0.5},
        w2_coefficient=1.0, temperature=0.5, rounds=100, samples_seen=3200, first_reward=0.25, final_reward=0.31,
        final_reward_std=0.02, final_diversity=12.5,
    )  # fmt: skip
    card = hub.model_card(summary, "me/sd35-orw", str(tmp_path))
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium"
    assert "`{clip_score: 1.0, aesthetic: 0.5}`" in card.text
    assert "0.25 → 0.31" in card.text and "| diversity, last round | 12.5 |" in card.text


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(push_to_hub=True), "hub_model_id: set it"),
        (dict(hub_model_id="a/b/c"), "hub_model_id"),
        (dict(hub_model_id="me/bad name"), "hub_model_id"),
    ],
)
def test_bad_hub_keys_are_one_line_errors(tiny_sd3_path, tmp_path, overrides, match):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), **overrides))
    with pytest.raises(ConfigError, match=match) as info:
        validate(cfg)
    assert "\n" not in str(info.value)
