"""The run-config examples of README.md and docs/*.md work as users write them: every ```yaml block, merged
over a minimal valid run config, loads through ``from_dict`` and validates; every training command line
parses (README's also validate). A misspelt key or a value out of range in a page fails here."""

import contextlib
import glob
import json
import os
import re
import shlex

import pytest
import yaml

from conftest import REPO, tiny_run_config
from orw_diffusers.config import from_dict, parse_args, validate
from orw_diffusers.errors import ConfigError

PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: how a training command line names the entry point; the run config's flags follow it
ENTRY_POINTS = ("train_scripts/train_orw_cfm_w2.py", "orw_diffusers.train", "orw-diffusers train")


def _read(page: str) -> str:
    with open(os.path.join(REPO, page)) as f:
        return f.read()


def yaml_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCED.findall(text) if lang == "yaml"]


def run_configs(block: str) -> list[dict]:
    """A block's run configs: one, or one per value of a key the block writes more than once (a page lists a
    key's alternatives that way: ``reward: clip_score`` then ``reward: {...}``)."""
    loader = yaml.SafeLoader("")
    pairs = [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
             for k, v in yaml.compose(block, Loader=yaml.SafeLoader).value]  # fmt: skip
    first = dict(reversed(pairs))
    repeated = [(k, v) for i, (k, v) in enumerate(pairs) if any(k == other for other, _ in pairs[:i])]
    return [first] + [{**first, k: v} for k, v in repeated]


def command_lines(text: str) -> list[list[str]]:
    """The run-config arguments of every training command of a page (fenced shell blocks and inline code)."""
    shell = "\n".join(body for lang, body in FENCED.findall(text) if lang in ("bash", "sh", "shell"))
    inline = re.findall(r"`([^`]+)`", FENCED.sub("", text))
    commands = shell.replace("\\\n", " ").splitlines() + [span.replace("\n", " ") for span in inline]
    found = []
    for command in commands:
        command = command.split(" #")[0]  # a shell comment
        if command.startswith("... --"):  # a command line shortened to its flags
            command = f"{ENTRY_POINTS[0]} {command[3:]}"
        entry = min((e for e in ENTRY_POINTS if e in command), key=command.index, default=None)
        if entry is None:
            continue
        rest = re.sub(r"\[[^\]]*\]|\.\.\.", " ", command.split(entry, 1)[1])  # '[--key value ...]': a placeholder
        args = shlex.split(rest, comments=True)
        if args:
            found.append(args)
    return found


@pytest.fixture
def users_dir(tmp_path, monkeypatch):
    """A working directory holding what the examples name: a pipeline directory (no weights: validation loads
    none), run.yaml (a minimal valid run config over it) and the README's my_rewards.py."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    base = tiny_run_config(str(model), str(tmp_path / "out"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base))
    for lang, body in FENCED.findall(_read("README.md")):
        name = re.match(r"# (\w+\.py)\b", body)
        if lang == "python" and name:
            (tmp_path / name.group(1)).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    return base


def check_block(block: str, base: dict) -> None:
    for values in run_configs(block):
        validate(from_dict({**base, **values}))


def check_command(args: list[str], validated: bool, out: str) -> None:
    """``args`` after the entry point; without --config they override run.yaml. A shipped config (configs/...)
    runs from the checkout's root, as the page says, and the users' directory's run.yaml from there."""
    if "--config" not in args:
        args = ["--config", "run.yaml", *args]
    shipped = not os.path.isfile(args[args.index("--config") + 1])
    with contextlib.chdir(REPO if shipped else os.getcwd()):
        cfg = parse_args([*args, "--output_dir", out])
        if validated:
            validate(cfg)


@pytest.mark.parametrize("page", PAGES)
def test_every_yaml_block_validates(page, users_dir):
    for block in yaml_blocks(_read(page)):
        check_block(block, users_dir)


def test_the_readme_has_examples_to_check():
    text = _read("README.md")
    assert yaml_blocks(text) and len(command_lines(text)) >= 3
    assert sum(len(yaml_blocks(_read(page))) for page in PAGES) >= 6


@pytest.mark.parametrize("page", PAGES)
def test_every_training_command_line_parses(page, users_dir, tmp_path):
    """README's commands also validate; the docs' may name files of the user's (a model factory, weights)."""
    for args in command_lines(_read(page)):
        check_command(args, validated=page == "README.md", out=str(tmp_path / "cmd-out"))


def test_a_misspelt_or_bad_example_fails(users_dir):
    block = yaml_blocks(_read("README.md"))[0]
    assert "checkpointing_steps" in block
    check_block(block, users_dir)
    with pytest.raises(ConfigError, match="unknown key 'checkpointing_step'"):
        check_block(block.replace("checkpointing_steps", "checkpointing_step"), users_dir)
    with pytest.raises(ConfigError, match="checkpoints_total_limit: 0"):
        check_block(block.replace("checkpoints_total_limit: 3", "checkpoints_total_limit: 0"), users_dir)
    with pytest.raises(ConfigError, match="reward: .*no_such_reward"):
        check_block("reward: clip_score\nreward: no_such_reward\n", users_dir)  # each alternative is checked
    with pytest.raises(ConfigError, match="unknown key 'learnin_rate'"):
        check_command(["--config", "run.yaml", "--learnin_rate", "1e-4"], validated=False, out="out")
    with pytest.raises(ConfigError, match="guidance_scale: 0.5"):
        check_command(["--guidance_scale", "0.5"], validated=True, out="out")
