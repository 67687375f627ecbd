"""diffusers' habits: the precision Accelerate gives, flags as diffusers' scripts take them, diffusers' key
names, checkpoint names, and shipped configs that validate as written."""

import glob
import json
import os

import pytest
import yaml

from conftest import REPO, tiny_run_config
from orw_diffusers import checkpoint
from orw_diffusers.config import (
    TrainConfig, from_dict, load_yaml, parse_args, parse_overrides, resolve_model_path,
    resolved_mixed_precision, validate,
)  # fmt: skip
from orw_diffusers.digits.data import DIGITS_MODEL_NAME
from orw_diffusers.errors import ConfigError


@pytest.fixture
def good(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return tiny_run_config(str(model), str(tmp_path / "out"))


def _write(tmp_path, values):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# --- mixed precision: the config's, else Accelerate's -----------------------------------------------


def test_precision_is_the_configs_else_accelerates_else_no(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert TrainConfig().mixed_precision is None
    assert resolved_mixed_precision(TrainConfig()) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")  # accelerate launch --mixed_precision bf16
    assert resolved_mixed_precision(TrainConfig()) == "bf16"
    assert resolved_mixed_precision(TrainConfig(mixed_precision="no")) == "no"  # the run config wins


def test_planner_plans_for_the_launch_precision(good, monkeypatch):
    from orw_diffusers.memory.planner import PlanSettings

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    settings = PlanSettings.from_train_config(TrainConfig(**good))
    assert settings.mixed_precision == "fp16" and settings.autocast_dtype is not None
    assert PlanSettings.from_train_config(TrainConfig(**good, mixed_precision="no")).mixed_precision == "no"


def test_launch_precision_is_validated_and_flux_refuses_launch_fp16(good, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="mixed_precision: 'fp8' \\(ACCELERATE_MIXED_PRECISION"):
        validate(TrainConfig(**good))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    good["pretrained_model_name_or_path"] = str(flux)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="mixed_precision: fp16 is not supported by FluxFamily"):
        validate(TrainConfig(**good))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    validate(TrainConfig(**good))


# --- flags ------------------------------------------------------------------------------------------


def test_bare_and_negated_booleans():
    values = parse_overrides(["--gradient_checkpointing", "--push_to_hub", "--no_log_w2_distance", "--rank", "4"])
    assert values == {"gradient_checkpointing": True, "push_to_hub": True, "log_w2_distance": False, "rank": 4}
    assert parse_overrides(["--push_to_hub", "false"]) == {"push_to_hub": False}
    assert parse_overrides(["--no-gradient-checkpointing"]) == {"gradient_checkpointing": False}
    assert parse_overrides(["--gradient_checkpointing"]) == {"gradient_checkpointing": True}  # last word
    with pytest.raises(ConfigError, match="--no_push_to_hub: takes no value"):
        parse_overrides(["--no_push_to_hub", "true"])
    with pytest.raises(ConfigError, match="--rank: missing value"):
        parse_overrides(["--rank", "--push_to_hub"])


def test_lists_as_separate_words_and_as_yaml(tmp_path, good):
    cfg = parse_args([
        "--config", _write(tmp_path, good), "--validation_prompts", "a red cat", "yes", "1",
        "--data_range", "-1", "1", "--lora_target_modules", "[attn.to_q, attn.to_k]", "--gradient_checkpointing",
    ])  # fmt: skip
    assert cfg.validation_prompts == ["a red cat", "yes", "1"]  # strings stay as written
    assert cfg.data_range == [-1.0, 1.0]
    assert cfg.lora_target_modules == ["attn.to_q", "attn.to_k"]
    assert cfg.gradient_checkpointing is True
    assert parse_args(["--config", _write(tmp_path, good), "--prompts", "a blue dog"]).prompts == ["a blue dog"]
    with pytest.raises(ConfigError, match="--rank: one value expected, got 2"):
        parse_overrides(["--rank", "4", "8"])


def test_diffusers_names_on_the_command_line_and_in_yaml(tmp_path, good):
    cfg = parse_args([
        "--config", _write(tmp_path, good), "--validation_prompt", "a red cat", "--hub_private_repo",
        "--lora_layers", "attn.to_q, attn.to_v", "--lora_dropout", "0.1", "--weighting_scheme", "logit_normal",
    ])  # fmt: skip
    assert cfg.validation_prompts == ["a red cat"] and cfg.hub_private is True
    assert cfg.lora_target_modules == ["attn.to_q", "attn.to_v"]
    assert cfg.lora_dropout == pytest.approx(0.1) and cfg.sigma_sampling == "logit_normal"
    good.update(validation_prompt="a blue dog", hub_private_repo=True, lora_layers="to_k", weighting_scheme="none")
    cfg = parse_args(["--config", _write(tmp_path, good)])
    assert (cfg.validation_prompts, cfg.hub_private, cfg.lora_target_modules, cfg.sigma_sampling) == (
        ["a blue dog"], True, ["to_k"], "uniform",
    )
    # the command line's alias overrides the YAML's key
    assert parse_args(["--config", _write(tmp_path, good), "--no_hub_private_repo"]).hub_private is False
    with pytest.raises(ConfigError, match="set either validation_prompt .* or validation_prompts"):
        from_dict({"validation_prompt": "a", "validation_prompts": ["b"]})


@pytest.mark.parametrize("scheme", ["mode", "cosmap", "sigma_sqrt"])
def test_unsupported_weighting_schemes_name_the_accepted_ones(scheme):
    with pytest.raises(ConfigError) as info:
        from_dict({"weighting_scheme": scheme})
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"weighting_scheme: {scheme!r}") and "none" in message and "logit_normal" in message


@pytest.mark.parametrize("key", ["num_train_epochs", "max_train_steps"])
def test_diffusers_run_lengths_point_to_num_epochs(key, tmp_path, good):
    with pytest.raises(ConfigError, match=f"^{key}: .*set num_epochs") as info:
        parse_args(["--config", _write(tmp_path, good), f"--{key}", "10"])
    assert "num_inner_epochs" not in str(info.value)


def test_lora_dropout_reaches_peft(good):
    import torch

    from orw_diffusers import lora
    from orw_diffusers.policies import build_policy

    class Model:
        lora_target_modules = ["attn.to_q"]

    module = torch.nn.Module()
    module.attn = torch.nn.Module()
    module.attn.to_q = torch.nn.Linear(4, 4)
    build_policy(TrainConfig(lora_dropout=0.25, rank=2, policy="lora"), Model()).attach(module)
    assert module.peft_config[lora.TRAINED].lora_dropout == 0.25
    with pytest.raises(ConfigError, match="lora_dropout: 1.0 must be in"):
        validate(TrainConfig(**good, lora_dropout=1.0))


def test_report_to_takes_accelerates_trackers(good):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert "mlflow" in LOGGER_TYPE_TO_CLASS
    validate(TrainConfig(**{**good, "report_to": "all"}))
    with pytest.raises(ConfigError, match="report_to: 'tensorbored' is not one of none, all, .*mlflow"):
        validate(TrainConfig(**{**good, "report_to": "tensorbored"}))
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="report_to: 'mlflow' needs `pip install mlflow`"):
            validate(TrainConfig(**{**good, "report_to": "mlflow"}))


# --- checkpoints by name ----------------------------------------------------------------------------


def test_resume_takes_a_bare_checkpoint_name(tmp_path, good):
    out = tmp_path / "out"
    for name in ("checkpoint-000002", "checkpoint-000004"):
        (out / "checkpoints" / name).mkdir(parents=True)
        (out / "checkpoints" / name / checkpoint.STATE_NAME).write_text("{}")
    two = str(out / "checkpoints" / "checkpoint-000002")
    assert checkpoint.resolve_resume("checkpoint-000002", str(out)) == two
    assert checkpoint.resolve_resume("checkpoint-2", str(out)) == two  # without the leading zeros
    assert checkpoint.resolve_resume(two, str(out)) == two  # a path still works
    validate(TrainConfig(**good, resume_from_checkpoint="checkpoint-000004"))
    with pytest.raises(ConfigError, match="'checkpoint-000003' is neither .* holds checkpoint-000002, checkpoint-0+4"):
        validate(TrainConfig(**good, resume_from_checkpoint="checkpoint-000003"))
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve_resume("checkpoint-000003", str(out))


# --- shipped configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))), ids=os.path.basename)
def test_every_shipped_config_validates_as_written(path, tmp_path, monkeypatch):
    """No model loads and the digits base is not built: only loading resolves its name."""
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    values = load_yaml(path)
    values["output_dir"] = str(tmp_path / "out")  # not the repo's outputs/, which may hold earlier runs
    validate(from_dict(values))
    assert not (tmp_path / "cache").exists()


def test_the_digits_name_resolves_to_the_cached_base_only_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path))
    configs = [load_yaml(os.path.join(REPO, "configs", n)) for n in ("digits_even.yaml", "digits_even_grpo.yaml")]
    assert all(c["pretrained_model_name_or_path"] == DIGITS_MODEL_NAME for c in configs)
    base = tmp_path / "digits-sd3-v2"
    (base / "classifiers").mkdir(parents=True)  # what a complete build holds
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (base / "digits_build.json").write_text("{}")
    assert resolve_model_path(DIGITS_MODEL_NAME) == str(base)  # reused, not rebuilt
    assert resolve_model_path("org/model") == "org/model"
