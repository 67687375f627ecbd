"""Model card and Hub upload, offline: the HfApi is a fake that records its calls."""

import fnmatch
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from conftest import TRAIN_SCRIPT, tiny_run_config
from orw_diffusers import hub, push
from orw_diffusers.card import RunSummary, base_model_license, family_tags, model_card, validation_images
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer

TOKEN = "hf_sentinel_token_that_must_never_appear"


class FakeApi:
    """Records whoami/create_repo/upload_folder and keeps the remote files: an upload first deletes the remote
    files matching ``delete_patterns`` (except those it uploads), as ``HfApi.upload_folder`` does."""

    def __init__(self, fail_upload: bool = False, whoami_error: Exception = None, role: str = "write"):
        self.calls = []
        self.commit_messages = []
        self.remote = set()
        self.fail_upload = fail_upload
        self.whoami_error = whoami_error
        self.role = role

    def whoami(self):
        self.calls.append(("whoami",))
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "me", "auth": {"accessToken": {"role": self.role}}}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, delete_patterns=None, **kwargs):
        on_disk = sorted(p for p in allow_patterns if os.path.isfile(os.path.join(folder_path, p)))
        self.calls.append(("upload_folder", repo_id, folder_path, sorted(allow_patterns), on_disk))
        self.commit_messages.append(kwargs.get("commit_message"))
        if self.fail_upload:
            raise ConnectionError("Max retries exceeded with url: /api/repos/create")
        stale = {f for f in self.remote if any(fnmatch.fnmatch(f, p) for p in delete_patterns or [])}
        self.remote = (self.remote - stale) | set(on_disk)
        return SimpleNamespace(commit_url="https://huggingface.co/fake/commit/1")


def _train(tiny_sd3_path, out, api, **overrides):
    values = dict(num_epochs=1, report_to="none", sample_log_interval=1, push_to_hub=True)
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(out), **{**values, **overrides}))
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
    assert {"diffusers", "diffusers-training", "lora", "template:sd-lora", "orw-cfm-w2", "sd3"} <= set(card.data.tags)
    assert "sd3.5" not in card.data.tags  # the tiny pipeline is an SD3 by its model_index, not a 3.5
    assert card.data.base_model is None  # a local base model is named in the text, not in the metadata
    assert card.data.license is None  # the tiny base has no card: the text asks for one
    assert card.data.widget == [{"text": "a red cat", "output": {"url": "samples/round_0000.png"}}]
    text = card.text
    for needle in ('pipe.load_lora_weights("tiny-orw")', "![samples](samples/round_0000.png)", "| rounds | 1 |",
                   "| samples seen | 8 |", "| `w2_coefficient` (alpha) | 0.1 |", "| `temperature` (tau) | 1 |",
                   "rewards_for_tests.py:brightness", "diversity, last round", "dtype=torch.bfloat16",
                   "License: **not set**"):  # fmt: skip
        assert needle in text, needle
    assert "torch_dtype" not in text
    assert "on the Hub as me/tiny-orw" in capsys.readouterr().out
    assert text.lstrip().startswith("# ORW-CFM-W2 LoRA adapter of") and "**ORW-CFM-W2**" in text
    assert "| objective | ORW-CFM-W2 (`orw_cfm_w2`) |" in text and "Flow-GRPO" not in text
    assert api.commit_messages == ["ORW-CFM-W2 LoRA: 1 rounds, 8 samples"]


def trained_card(tiny_sd3_path, out, **overrides):
    """(the model card, the fake Hub API) of a one-round run of ``overrides`` pushed to the fake Hub."""
    from huggingface_hub import ModelCard

    api = FakeApi()
    trainer, cfg = _train(tiny_sd3_path, out, api, **overrides)
    trainer.train()
    return ModelCard.load(os.path.join(cfg.output_dir, "README.md")), api


def test_a_flow_grpo_run_has_a_flow_grpo_card_and_push(tiny_sd3_path, tmp_path):
    grpo = dict(objective="flow_grpo", sde_window_size=2, kl_beta=0.01, kl_type="exact", clip_range=0.2)
    card, api = trained_card(tiny_sd3_path, tmp_path / "out", hub_model_id="tiny-grpo", **grpo)
    assert "flow-grpo" in card.data.tags and "orw-cfm-w2" not in card.data.tags
    text = card.text
    assert text.lstrip().startswith("# Flow-GRPO LoRA adapter of") and "**Flow-GRPO**" in text
    for needle in ("| objective | Flow-GRPO (`flow_grpo`) |", "| `kl_beta` | 0.01 |", "| `kl_type` | exact |",
                   "| `clip_range` | 0.2 |", "| `sde_window_size` | 2 |"):  # fmt: skip
        assert needle in text, needle
    assert "ORW-CFM-W2" not in text and "w2_coefficient" not in text and "temperature" not in text
    assert api.commit_messages == ["Flow-GRPO LoRA: 1 rounds, 8 samples"]


def test_validation_grids_make_the_widget_and_a_new_push_drops_stale_samples(tiny_sd3_path, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    api = FakeApi()
    trainer, cfg = _train(tiny_sd3_path, out, api, hub_model_id="me/orw", num_epochs=2, sample_log_interval=0,
                          validation_prompts=["a red cat", "a dark dog"], validation_interval=1)  # fmt: skip
    hub.prepare_repo(cfg, api)
    trainer.train()
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.widget == [
        {"text": "after 2 rounds: a red cat; a dark dog", "output": {"url": "samples/validation_0002.png"}},
        {"text": "after 1 rounds: a red cat; a dark dog", "output": {"url": "samples/validation_0001.png"}},
        {"text": "base model: a red cat; a dark dog", "output": {"url": "samples/validation_0000.png"}},
    ]
    grids = {f"samples/validation_000{i}.png" for i in range(3)}
    assert grids <= api.remote and "![samples](samples/validation_0002.png)" in card.text

    # A later push of the same folder with other sample images: the old ones leave the repo.
    for name in ("validation_0000.png", "validation_0001.png"):
        (out / "samples" / name).unlink()
    assert push.main([str(out), "--hub_model_id", "me/orw"], api=api) == 0
    assert {f for f in api.remote if f.startswith("samples/")} == {"samples/validation_0002.png"}
    assert LORA_WEIGHTS_NAME in api.remote
    assert push.main([str(out)], api=api) == 0  # --hub_model_id defaults to the run's own
    assert api.calls[-2][:2] == ("create_repo", "me/orw")
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("hub_model_id: me/orw", "hub_model_id: null"))
    assert push.main([str(out)], api=api) == 0  # else to the folder's name
    assert api.calls[-2][:2] == ("create_repo", "out") and api.calls[-1][1] == "me/out"


def test_widget_keeps_the_first_last_and_evenly_spaced_validation_grids(tmp_path):
    (tmp_path / "samples").mkdir()
    for rounds in range(0, 10):
        (tmp_path / "samples" / f"validation_{rounds:04d}.png").write_bytes(b"")
    picked = [rounds for rounds, _ in validation_images(str(tmp_path))]
    assert picked == [9, 6, 3, 0]


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
    err = capsys.readouterr().err
    assert "none of pytorch_lora_weights.safetensors, lora_adapter.safetensors, model.safetensors" in err


def test_card_names_a_hub_base_model_in_its_metadata(tmp_path):
    summary = RunSummary(
        base_model="stabilityai/stable-diffusion-3.5-medium", reward={"clip_score": 1.0, "aesthetic": 0.5},
        objective="orw_cfm_w2", rounds=100, samples_seen=3200, first_reward=0.25, final_reward=0.31,
        final_reward_std=0.02, final_diversity=12.5,
        family_tags=family_tags("stabilityai/stable-diffusion-3.5-medium"),
        license={"license": "other", "license_name": "stabilityai-ai-community",
                 "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"},
    )  # fmt: skip
    card = model_card(summary, "me/sd35-orw", str(tmp_path))
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium"
    assert {"sd3", "sd3.5", "template:sd-lora", "diffusers-training", "lora"} <= set(card.data.tags)
    assert (card.data.license, card.data.license_name) == ("other", "stabilityai-ai-community")
    assert card.data.license_link.endswith("/LICENSE.md") and "License: `other`, inherited" in card.text
    assert "not set" not in card.text and "widget" not in card.data.to_dict()  # no images: no gallery
    assert 'from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16)' in card.text
    assert "`{clip_score: 1.0, aesthetic: 0.5}`" in card.text
    assert "0.25 → 0.31" in card.text and "| diversity, last round | 12.5 |" in card.text


@pytest.mark.parametrize(
    "base, class_name, tags",
    [
        ("stabilityai/stable-diffusion-3.5-medium", None, ["sd3", "sd3.5"]),
        ("stabilityai/stable-diffusion-3-medium-diffusers", None, ["sd3"]),
        ("black-forest-labs/FLUX.1-dev", None, ["flux"]),
        ("my-sd3_5-copy", "StableDiffusion3Pipeline", ["sd3", "sd3.5"]),
        ("pipeline", "StableDiffusion3Pipeline", ["sd3"]),
        ("pipeline", "FluxPipeline", ["flux"]),
        ("pipeline", "SomeOtherPipeline", []),
    ],
)
def test_family_tags_from_the_pipeline_class_or_the_name(tmp_path, base, class_name, tags):
    if class_name is not None:
        (tmp_path / base).mkdir()
        (tmp_path / base / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        base = str(tmp_path / base)
    assert family_tags(base) == tags


def test_license_comes_from_the_base_models_card_else_the_card_asks_for_it(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    base.mkdir()
    assert base_model_license(str(base)) == {}  # no README.md
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE.md\n---\n")
    assert base_model_license(str(base)) == {"license": "other", "license_name": "my-license"}  # link: local

    loads = []

    def offline(repo_id, *args, **kwargs):
        loads.append(repo_id)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(ModelCard, "load", offline)
    assert base_model_license("org/model") == {} and loads == ["org/model"]  # offline: fall back, no raise
    hub_card = ModelCard("---\nlicense: other\nlicense_link: LICENSE\n---\n")
    monkeypatch.setattr(ModelCard, "load", lambda repo_id, *a, **k: hub_card)
    assert base_model_license("org/model") == {
        "license": "other", "license_link": "https://huggingface.co/org/model/blob/main/LICENSE"
    }


class _Cfg(SimpleNamespace):
    push_to_hub = True
    hub_private = False
    hub_model_id = None


def test_prepare_repo_checks_the_token_and_creates_the_repo_named_after_output_dir(tmp_path):
    api = FakeApi()
    cfg = _Cfg(output_dir=str(tmp_path / "sd35m-clip") + "/", hub_private=True)
    assert hub.prepare_repo(cfg, api) == "me/sd35m-clip" == cfg.hub_model_id
    assert api.calls == [("whoami",), ("create_repo", "me/sd35m-clip", True, True)]
    assert hub.prepare_repo(_Cfg(output_dir=str(tmp_path), push_to_hub=False), api) is None
    assert hub.prepare_repo(_Cfg(output_dir=str(tmp_path), hub_model_id="org/x"), FakeApi(), main_process=False) is None
    assert len(api.calls) == 2  # nothing more was asked of the Hub


@pytest.mark.parametrize(
    "api, match",
    [
        (FakeApi(whoami_error=OSError("Token is required to call the /whoami-v2 endpoint, but no token found.")),
         "push_to_hub: the Hub token check \\(whoami\\) failed \\(OSError: Token is required"),
        (FakeApi(whoami_error=PermissionError(f"401 Unauthorized: bad token {TOKEN}\nmore")), "hf auth login"),
        (FakeApi(role="read"), "read-only"),
    ],
)
def test_prepare_repo_fails_in_one_line_without_a_usable_token(tmp_path, api, match):
    with pytest.raises(ConfigError, match=match) as info:
        hub.prepare_repo(_Cfg(output_dir=str(tmp_path), hub_model_id="me/x"), api)
    assert "\n" not in str(info.value) and "sentinel" not in str(info.value)
    assert not any(call[0] == "create_repo" for call in api.calls)


@pytest.mark.parametrize("repo_id", ["a/b/c", "me/bad name", "me/-x", "x" * 97])
def test_bad_hub_model_ids_are_one_line_errors_before_the_hub_is_asked(tmp_path, repo_id, capsys):
    api = FakeApi()
    with pytest.raises(ConfigError, match="hub_model_id: .* is not a Hub repo id") as info:
        hub.prepare_repo(_Cfg(output_dir=str(tmp_path), hub_model_id=repo_id), api)
    assert "\n" not in str(info.value) and api.calls == []
    (tmp_path / LORA_WEIGHTS_NAME).write_bytes(b"")
    assert push.main([str(tmp_path), "--hub_model_id", repo_id], api=api) == 2 and api.calls == []
    assert "--hub_model_id: " in capsys.readouterr().err


def test_train_script_stops_in_seconds_without_a_token(tiny_sd3_path, tmp_path, monkeypatch, capsys):
    """The script checks the token before the model loads: exit 2, one line, no token printed."""
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    from orw_diffusers import build

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # even a token in the environment must not be printed
    api = FakeApi(whoami_error=LocalTokenNotFoundError(f"Invalid user token {TOKEN}."))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: api)
    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model loaded before the Hub check"))
    spec = importlib.util.spec_from_file_location("train_script_hub", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--pretrained_model_name_or_path", tiny_sd3_path, "--output_dir", str(tmp_path / "run"),
            "--prompts", "a red cat", "--reward", "jpeg_compressibility", "--push_to_hub", "true",
            "--hub_model_id", "tiny-orw"]  # fmt: skip
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: push_to_hub: the Hub token check (whoami) failed (LocalTokenNotFoundError")
    assert TOKEN not in err and "hf_***" in line
    assert api.calls == [("whoami",)]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hub_model_id="a/b/c"), "hub_model_id"),
        (dict(hub_model_id="me/bad name"), "hub_model_id"),
    ],
)
def test_bad_hub_keys_are_one_line_errors(tiny_sd3_path, tmp_path, overrides, match):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), **overrides))
    with pytest.raises(ConfigError, match=match) as info:
        validate(cfg)
    assert "\n" not in str(info.value)
