"""Peak resident memory of this process, and memory benchmarks whose measurements each run in a fresh
process: the kernel's peak mark cannot go below what earlier work in the process left resident.

The glibc settings that make RSS follow the live tensors are ``bench.common.child_env``'s.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from bench.common import MMAP_THRESHOLD, Section, emit, parser, reps_of, run_child, set_threads


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not permitted.
    (getrusage's ru_maxrss cannot be reset, hence a fresh process per measured variant.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """What MALLOC_MMAP_THRESHOLD_ in ``child_env`` does, for an already running process."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def start_measuring() -> int:
    """Make this process a measuring one (1 thread, freed memory returned at once); its RSS now, in bytes."""
    set_threads(1)
    return_freed_memory()
    return rss_bytes()


@dataclass
class PeakRss:
    before: int  # RSS just before the call (after a garbage collection)
    peak: int  # the kernel's peak-RSS mark after it
    reset: bool  # whether the mark could be reset before the call (else ``peak`` may predate it)


def peak_rss_of(fn: Callable[[], Any], require_reset: bool = False) -> PeakRss:
    """Peak RSS of ``fn()`` in this process: the peak mark is reset to the current RSS just before."""
    gc.collect()
    before = rss_bytes()
    reset = reset_peak_rss()
    if require_reset and not reset:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no valid measurement")
    fn()
    return PeakRss(before, peak_rss_bytes(), reset)


@dataclass(frozen=True)
class MeasuredInChildren:
    """A benchmark's measurements, each in a fresh process: ``python -m <module> --child NAME [--quick]``
    prints ``measure(NAME, quick)`` as JSON. With --quick they run in this process instead, which is
    enough to check that they run."""

    module: str
    measure: Callable[[str, bool], dict]
    names: Optional[Sequence[str]] = None  # the valid NAMEs; None: any

    def result(self, name: str, quick: bool) -> dict:
        return self.measure(name, quick) if quick else run_child(self.module, ["--child", name])

    def main(
        self, run: Callable[[bool, int], Section], doc: str, argv: Optional[Sequence[str]], default_reps: int
    ) -> int:
        """The benchmark's ``main``: one measurement with --child, else ``run(quick, reps)`` and its section."""
        p = parser(doc.splitlines()[0])
        p.add_argument("--child", choices=self.names, default=None, help="(internal) measure one and print JSON")
        args = p.parse_args(argv)
        if args.child:
            print(json.dumps(self.measure(args.child, args.quick)))
            return 0
        emit(run(args.quick, reps_of(args, default_reps)), args)
        return 0
