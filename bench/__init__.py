"""The timing benchmarks behind docs/benchmarks.md (``bench/common.py``), run from the repository root as
``python -m bench.<name>``; the digits studies in ``experiments/`` share ``REPO`` and ``markdown_table`` from here."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def markdown_table(rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table; ``rows[0]`` is the header."""
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(map(str, row)) + " |" for row in body
    ]
