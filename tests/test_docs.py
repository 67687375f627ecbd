"""The README stays in step with the code: the configuration reference is the generated one."""

import os

from conftest import REPO
from orw_diffusers.config_docs import config_reference_markdown, readme_block


def test_readme_config_reference_is_current():
    with open(os.path.join(REPO, "README.md")) as f:
        block = readme_block(f.read())
    assert block == config_reference_markdown(), "run: python -m orw_diffusers.config_docs --write"


def test_quickstart_commands_exist():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in text
        assert os.path.isfile(os.path.join(REPO, script))
