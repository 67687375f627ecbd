"""The ``orw-diffusers`` console script: each subcommand reaches its entry point with the rest of argv."""

import os
import shutil
import subprocess
import sys
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
        ("train", "Fine-tune a flow-matching model towards a reward"),
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


def test_train_runs_from_an_installed_wheel(tmp_path):
    """The wheel alone, installed into an empty directory, trains: no train_scripts/, no source checkout."""
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(os.path.join(REPO, "orw_diffusers"), source / "orw_diffusers",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("orw_diffusers-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path,
                   capture_output=True, timeout=300)  # fmt: skip
    assert not (site / "train_scripts").exists()
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import orw_diffusers; print(orw_diffusers.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(str(site))  # the wheel's copy is the one imported, not the checkout's
    proc = subprocess.run([sys.executable, "-m", "orw_diffusers.cli", "train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Fine-tune a flow-matching model towards a reward" in proc.stdout and "--config" in proc.stdout
