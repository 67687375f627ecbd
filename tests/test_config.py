"""Config loading, overrides, prompts, and the one-line exit-2 errors for bad values."""

import importlib.util
import json
import os
import subprocess

import pytest
import yaml

from conftest import TRAIN_SCRIPT, python, tiny_run_config
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig, derive_sizes, parse_args, validate
from orw_diffusers.prompts import load_prompts


def _load_script():
    spec = importlib.util.spec_from_file_location("train_orw_cfm_w2", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path, values, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture
def good(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (tmp_path / "EMPTY_DIR").mkdir()
    return tiny_run_config(str(model), str(tmp_path / "out"))


BAD_CASES = [
    ("w2_coefficient", {"w2_coefficient": -0.5}, "-0.5"),
    ("temperature", {"temperature": 0}, "0"),
    ("temperature", {"temperature": -1.0, "weight_normalization": "none"}, "-1.0"),
    ("sample_batch_size", {"sample_batch_size": 3}, "3"),
    ("train_batch_size", {"train_batch_size": 5}, "5"),
    ("gradient_accumulation_steps", {"train_batch_size": 2, "gradient_accumulation_steps": 3}, "3"),
    ("unknown key 'learnin_rate'", {"learnin_rate": 1e-4}, "learning_rate"),
    ("reward", {"reward": "no_such_reward"}, "no_such_reward"),
    ("reward", {"reward": {"jpeg_compressibility": "heavy"}}, "heavy"),
    ("prompt_file", {"prompts": None, "prompt_file": "/no/such/prompts.txt"}, "/no/such/prompts.txt"),
    ("pretrained_model_name_or_path", {"pretrained_model_name_or_path": "/no/such/model"}, "/no/such/model"),
    ("pretrained_model_name_or_path", {"pretrained_model_name_or_path": "not a hub id"}, "not a hub id"),
    ("weight_normalization", {"weight_normalization": "softmax"}, "softmax"),
    ("sigma_sampling", {"sigma_sampling": "cosmap"}, "cosmap"),
    ("sampling_solver", {"sampling_solver": "rk4"}, "rk4"),
    ("mixed_precision", {"mixed_precision": "fp8"}, "fp8"),
    ("rank", {"rank": 0}, "0"),
    ("learning_rate", {"learning_rate": "fast"}, "fast"),
    ("prompts", {"prompts": None}, "none"),
    ("reward_dtype", {"reward_dtype": "int8"}, "int8"),
    ("reward_batch_size", {"reward_batch_size": 0}, "0"),
    ("prompts_per_round", {"prompts_per_round": 0}, "0"),
    ("pretrained_model_name_or_path", {"pretrained_model_name_or_path": "EMPTY_DIR"}, "model_index.json"),
]


@pytest.mark.parametrize("key,change,value", BAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_values_exit_2_with_one_line_naming_key_and_value(tmp_path, good, capsys, key, change, value):
    good.update(change)
    if good["pretrained_model_name_or_path"] == "EMPTY_DIR":
        good["pretrained_model_name_or_path"] = str(tmp_path / "EMPTY_DIR")
    rc = _load_script().main(["--config", _write(tmp_path, good)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert key in err and value in err, err


def test_cli_exit_code_and_no_traceback(tmp_path, good):
    """The real process: exit status 2, one line on stderr, no traceback, no model loaded."""
    good["w2_coefficient"] = -1
    proc = subprocess.run(
        [python(), TRAIN_SCRIPT, "--config", _write(tmp_path, good)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: w2_coefficient: -1")
    proc = subprocess.run([python(), TRAIN_SCRIPT, "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_win_over_yaml_and_are_typed(tmp_path, good):
    cfg = parse_args(
        [
            "--config", _write(tmp_path, good),
            "--learning_rate", "3e-4",
            "--num_epochs=7",
            "--gradient_checkpointing", "true",
            "--lora_target_modules", "[attn.to_q, attn.to_k]",
            "--reward", "{jpeg_compressibility: 1.0, jpeg_incompressibility: 0.5}",
        ]
    )  # fmt: skip
    assert cfg.learning_rate == pytest.approx(3e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.num_epochs == 7 and cfg.gradient_checkpointing is True
    assert cfg.lora_target_modules == ["attn.to_q", "attn.to_k"]
    assert cfg.reward == {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}
    assert cfg.rank == good["rank"]


def test_bad_override_type_is_a_config_error(tmp_path, good):
    with pytest.raises(ConfigError, match="num_epochs: expected an integer, got 'many'"):
        parse_args(["--config", _write(tmp_path, good), "--num_epochs", "many"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_args(["--config", _write(tmp_path, good), "--num_epochs"])


def test_derived_sizes():
    cfg = TrainConfig(prompts_per_round=4, images_per_prompt=4, sample_batch_size=4, train_batch_size=2,
                      gradient_accumulation_steps=2, num_inner_epochs=3)  # fmt: skip
    sizes = derive_sizes(cfg, num_prompts=10, num_processes=2)
    assert sizes.samples_per_round == 16 and sizes.samples_per_process == 8
    assert sizes.sample_batches_per_process == 2 and sizes.micro_batches_per_process == 4
    assert sizes.optimizer_steps_per_round == 6
    with pytest.raises(ConfigError, match="3 processes"):
        derive_sizes(cfg, num_prompts=10, num_processes=3)


def test_hub_ids_pass_validation_without_network(good, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("validation reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    good["pretrained_model_name_or_path"] = "stabilityai/stable-diffusion-3.5-medium"
    sizes = validate(TrainConfig(**good))
    assert sizes == derive_sizes(TrainConfig(**good), num_prompts=len(good["prompts"]), num_processes=1)
    good["pretrained_model_name_or_path"] = "not a hub id"  # the same check refuses what is neither
    with pytest.raises(ConfigError, match="'not a hub id' is not an existing local directory nor a hub id"):
        validate(TrainConfig(**good))


def test_prompt_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red cat\n\n a blue dog \n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": p}) for p in ["one", "two", "three"]))
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt\n1,first\n2,\"second, with comma\"\n")
    assert load_prompts(TrainConfig(prompt_file=str(txt))) == ["a red cat", "a blue dog"]
    assert load_prompts(TrainConfig(prompt_file=str(jsonl), prompt_column="caption")) == ["one", "two", "three"]
    assert load_prompts(TrainConfig(prompt_file=str(csv))) == ["first", "second, with comma"]
    with pytest.raises(ConfigError, match="prompt_column: 'text'"):
        load_prompts(TrainConfig(prompt_file=str(csv), prompt_column="text"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_prompts(TrainConfig(prompts=["x"], prompt_file=str(txt)))


def test_prompt_dataset_from_local_files_offline(tmp_path):
    import datasets

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in ["alpha", "beta"]))
    assert load_prompts(TrainConfig(prompt_dataset=str(jsonl), prompt_column="text")) == ["alpha", "beta"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"prompt": ["x", "y", "z"]}).save_to_disk(str(saved))
    assert load_prompts(TrainConfig(prompt_dataset=str(saved))) == ["x", "y", "z"]
    assert os.path.isdir(saved)


def test_paths_expand_home_and_environment_variables(tmp_path, good, monkeypatch):
    monkeypatch.setenv("ORW_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    good.update(pretrained_model_name_or_path="$ORW_TEST_ROOT/model", output_dir="~/runs/a")
    cfg = parse_args(["--config", _write(tmp_path, good)])
    assert cfg.pretrained_model_name_or_path == str(tmp_path / "model")
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    validate(cfg)


def test_each_key_is_declared_once_by_its_part():
    """The run config is composed from the parts' key blocks: every key once, in the blocks' order; an objective's
    keys are its own block's plus the ones it shares, declared by another objective."""
    import dataclasses

    from orw_diffusers.config import KEY_BLOCKS, compose, field_names
    from orw_diffusers.keys import KeyBlock, key_names
    from orw_diffusers.objectives import OBJECTIVES
    from orw_diffusers.policies.lora import LoRAKeys

    names = [name for block in KEY_BLOCKS for name in key_names(block.keys)]
    assert names == field_names() and len(set(names)) == len(names)
    assert list(TrainConfig().to_dict()) == names
    for objective in OBJECTIVES.values():
        own = key_names(objective.key_block)
        assert own and objective.config_keys[: len(own)] == own
        assert set(objective.config_keys[len(own):]) <= set(names) - set(own)
    assert {f.name: f.metadata["path"] for f in dataclasses.fields(TrainConfig)}["model_checkpoint"] is True
    with pytest.raises(TypeError, match="duplicated"):
        compose((*KEY_BLOCKS, KeyBlock("LoRA, again", LoRAKeys)))
