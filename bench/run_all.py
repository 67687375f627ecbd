"""Run every benchmark, each in its own process, and write ``docs/benchmarks.md``.

    python -m bench.run_all                       # all of them (~30 min on 2 CPU cores)
    python -m bench.run_all --only w2_overhead    # some of them; the others' saved results are reused
    python -m bench.run_all --quick --output /tmp/benchmarks.md   # a smoke run

Results are also kept as JSON under ``--results`` (default /tmp/orw-bench-results), so the document
can be rebuilt from earlier runs with ``--only`` naming none (``--only ''``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

from bench import REPO, markdown_table
from bench.common import Section, child_env, machine_info

# module -> (the promise it checks, the summary's figure, target, and measured value from its results);
# order = order in the document. Met: the section's results["met"].
BENCHMARKS: dict[str, tuple[str, str, str, Callable[[dict], str]]] = {
    "w2_overhead": (
        "the W2 regulariser costs one forward pass without gradient",
        "step time W2 / no W2, against the floor (fwd+bwd+fwd_ref)/(fwd+bwd)", "≤ floor × 1.05",
        lambda r: f"{r['step_ratio']:.3f} vs floor {r['floor']:.3f} (×{r['excess']:.3f})"),
    "round_efficiency": (
        "the time of a round goes to the models, not to our code", "round time / sum of its model computations − 1",
        "≤ 10%", lambda r: f"{r['overhead']:.1%} per repetition; {r['overhead_of_medians']:.1%} from the medians"),
    "sampler_vs_diffusers": (
        "our sampler is at least as fast as Diffusers' pipeline", "images/s ours / StableDiffusion3Pipeline", "≥ 1.0",
        lambda r: f"{r['speedup']:.3f}"),
    "two_processes": (
        "Accelerate scales the same script to more processes", "samples/s, 2 processes / 1 process", "≥ 1.7",
        lambda r: f"{r['speedup']:.2f} wall-clock with a load average of {r['load']:.1f} on 2 cores; "
                  f"{r['cpu_speedup']:.2f} in CPU time (a core per process)"),
    "planner_validation": (
        "one 24 GB A10 is enough for SD3.5-Medium (via the memory planner, validated here)",
        "planner activation estimate vs. measured peak (3 configs)", "within ±20%",
        lambda r: f"worst {r['max_abs_error']:.1%}"),
}  # fmt: skip


def _summary_rows(sections: dict[str, dict]) -> list[list[str]]:
    rows = [["promise", "figure", "target", "measured (median)", "met"]]
    for name, (promise, figure, target, measured) in BENCHMARKS.items():
        r = sections.get(name, {}).get("results")
        if r:
            rows.append([promise, figure, target, measured(r), "yes" if r["met"] else "**no**"])
    return rows


def render(sections: dict[str, dict], machine: str, quick: bool) -> str:
    lines = [
        "# Benchmarks", "",
        "Each promise of the design, measured as a ratio in one run on a small CPU machine. The model is a "
        "scaled-down SD3 transformer with SD3.5's shape (16 latent channels, patch 2, RMS q/k norm, a dual-attention "
        "layer, 77 CLIP + zero T5 context tokens), built in code and loaded with `from_pretrained`; nothing is "
        "downloaded. Ratios are taken per repetition (the compared variants interleaved, order rotated) and "
        "reported as median (min–max), because the machine was shared with other jobs.", "",
        f"Machine: {machine}.", "",
        "Reproduce everything: `python -m bench.run_all` (rewrites this file). Benchmarks are scripts, not tests: "
        "`tests/test_bench.py` only checks that each one runs (`--quick`).", "",
    ]  # fmt: skip
    if quick:
        lines += ["**This file was written by a `--quick` smoke run: the numbers are meaningless.**", ""]
    lines += ["## Summary", "", *markdown_table(_summary_rows(sections)), "",
              "The A10 statement itself is the memory planner's, whose activation model the last section validates: "
              "see [memory.md](memory.md).", ""]  # fmt: skip
    lines += [Section(**sections[name]).markdown() for name in BENCHMARKS if name in sections]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 repetition")
    p.add_argument("--only", nargs="*", default=None, help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--results", default="/tmp/orw-bench-results", help="directory of the per-benchmark JSON results")
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    unknown = set(args.only or []) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    os.makedirs(args.results, exist_ok=True)
    todo = list(BENCHMARKS) if args.only is None else args.only
    machine = machine_info()
    for name in todo:
        result = os.path.join(args.results, f"{name}.json")
        cmd = [sys.executable, "-m", f"bench.{name}", "--json", result] + (["--quick"] if args.quick else [])
        print(f"running {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=REPO, env=child_env(), check=True)  # the memory benchmark sets glibc up in its children
    paths = {name: os.path.join(args.results, f"{name}.json") for name in BENCHMARKS}
    sections = {name: json.loads(open(path).read()) for name, path in paths.items() if os.path.isfile(path)}
    with open(args.output, "w") as f:
        f.write(render(sections, machine, args.quick))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
