"""The docs stay in step with the code: the configuration reference is the generated one, and every link resolves."""

import glob
import os
import re

from conftest import REPO
from orw_diffusers.config_docs import PAGE, configuration_page

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_configuration_page_is_current():
    assert _read(os.path.join(REPO, PAGE)) == configuration_page(), "run: python -m orw_diffusers.config_docs --write"


def test_readme_links_the_configuration_reference():
    assert "](docs/configuration.md)" in _read(os.path.join(REPO, "README.md"))


def test_quickstart_commands_exist():
    text = _read(os.path.join(REPO, "README.md"))
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in text
        assert os.path.isfile(os.path.join(REPO, script))


def test_readme_stays_short():
    assert len(_read(os.path.join(REPO, "README.md")).splitlines()) <= 350  # longer sections live in docs/


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a #fragment names a heading."""
    broken = []
    for page in [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
        text = _read(page)
        for target in LINK.findall(FENCE.sub("", text)):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, fragment = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, REPO)}: {target}")
            elif fragment and file.endswith(".md") and fragment not in _anchors(_read(file)):
                broken.append(f"{os.path.relpath(page, REPO)}: {target} (no such heading)")
    assert not broken, broken
