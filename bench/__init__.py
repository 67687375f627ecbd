"""Benchmarks (``bench/common.py``, docs/benchmarks.md) and the digits studies (``bench/sweep.py``, docs/results.md),
run from the repository root as ``python -m bench.<name>``. What both kinds share is here."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def markdown_table(rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table; ``rows[0]`` is the header."""
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(map(str, row)) + " |" for row in body
    ]
