"""``orw-diffusers train|push|evaluate|memory ...``: one console script for the package's entry points.

    orw-diffusers train --config run.yaml [--key value ...]    # one process: orw_diffusers.train
    orw-diffusers push OUTPUT_DIR [--hub_model_id name]          # upload (or retry uploading) a finished run
    orw-diffusers evaluate --lora OUTPUT_DIR ...                 # base vs fine-tuned report
    orw-diffusers memory --config run.yaml ...                   # will it fit? the memory planner

Everything after the command goes to that entry point unchanged (``orw-diffusers memory --help``).
Several processes or GPUs go through ``accelerate launch -m orw_diffusers.train``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

#: command -> (the module whose ``main(argv)`` it runs, one line of help).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("orw_diffusers.train", "fine-tune a model (one process; see accelerate launch for more)"),
    "push": ("orw_diffusers.push", "upload a finished run to the Hub, or retry a failed upload"),
    "evaluate": ("orw_diffusers.evaluate", "compare the base and the fine-tuned model on prompts and rewards"),
    "memory": ("orw_diffusers.memory.cli", "estimate the memory of a run config and suggest what fits"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: orw-diffusers {{{','.join(COMMANDS)}}} [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`orw-diffusers COMMAND --help` lists a command's arguments."]
    return "\n".join(lines)


def entry_point(command: str) -> Callable[[list[str]], Optional[int]]:
    """The ``main(argv)`` that ``command`` runs (imported only now: each entry point keeps its imports lazy)."""
    return importlib.import_module(COMMANDS[command][0]).main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``argv[0]`` to its entry point with the rest of ``argv``; returns its exit status.

    No command, or ``-h``/``--help``: the usage (exit 0 for help, 2 without a command). An unknown
    command: one line naming the accepted ones, exit 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; accepted: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    status = entry_point(command)(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
