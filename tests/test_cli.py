"""The ``orw-diffusers`` console script: each subcommand reaches its entry point with the rest of argv."""

import tomllib

import pytest

from conftest import REPO
from orw_diffusers import cli


@pytest.mark.parametrize(
    "command, prog",
    [
        ("memory", "orw_diffusers.memory"),
        ("push", "orw-diffusers push"),
        ("evaluate", "orw_diffusers.evaluate"),
        ("train", "ORW-CFM-W2 LoRA fine-tuning"),
    ],
)
def test_each_command_shows_its_entry_points_help(command, prog, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert prog in capsys.readouterr().out


def test_the_rest_of_argv_and_the_exit_status_pass_through(monkeypatch):
    import orw_diffusers.push

    seen = []
    monkeypatch.setattr(orw_diffusers.push, "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["push", "out", "--hub_model_id", "me/x"]) == 3
    assert seen == [["out", "--hub_model_id", "me/x"]]


def test_train_runs_the_training_script(tmp_path, capsys):
    assert cli.main(["train", "--learning_rate", "-1", "--output_dir", str(tmp_path)]) == 2  # the script's own check
    err = capsys.readouterr().err
    assert "learning_rate" in err and "\n" not in err.strip()


def test_unknown_or_missing_command_exits_2_naming_the_accepted_ones(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown command 'trian'; accepted: train, push, evaluate, memory"
    assert cli.main([]) == 2 and "usage: orw-diffusers {train,push,evaluate,memory}" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "memory" in capsys.readouterr().out


def test_the_console_script_is_registered():
    with open(f"{REPO}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"] == {"orw-diffusers": "orw_diffusers.cli:main"}
    names = {dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert {"open-clip-torch", "torchvision"} <= names  # the default reward, clip_score, needs both
