"""Benchmark 7, memory planner validation: the planner's estimates (``MemoryPlanner``, reading the saved model
directory on the meta device) against the measured peak-RSS increase on CPU, for scaled-down SD3 configs of
different depth, width and resolution, in fp32: one training micro-batch (``optimise``: reference forward, forward,
backward, clipping, AdamW step), one Euler step of the sampling batch (``rollouts.record``) and one VAE decode, each
after a warm-up.

    python -m bench.planner_validation [--quick] [--reps N]

Each measurement runs in a fresh process (``--child NAME``): the kernel's peak-RSS mark cannot go below what
earlier work in the process left resident. With --quick they run in this process.
"""

from __future__ import annotations

import ctypes
import gc
import json
from typing import Optional, Sequence

import torch

from bench.common import (MMAP_THRESHOLD, ModelSpec, Section, Stat, fixed_round, load_note, parser, run_child, run_main,
                          saved_pipeline, set_threads)  # fmt: skip

CONFIGS = {
    "A: 2 layers, hidden 128, 128 px": ModelSpec(layers=2, heads=2, head_dim=64, latent_size=16),
    "B: 4 layers, hidden 256, 256 px": ModelSpec(layers=4, heads=4, head_dim=64, latent_size=32),
    "C: 8 layers, hidden 384, 384 px": ModelSpec(layers=8, heads=6, head_dim=64, latent_size=48),
}
QUICK_CONFIGS = {"quick: 1 layer, hidden 32, 64 px": ModelSpec(layers=1, heads=2, head_dim=16, latent_size=8,
                                                                 vae_blocks=(8, 16, 16, 16), text_hidden=16)}
BATCH = 2
RANK = 16
MAX_SEQUENCE_LENGTH = 32
TARGET = 0.20
PHASES = ("train", "sample", "decode")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_rss_increase(fn) -> int:
    """Bytes: the kernel's peak-RSS mark (VmHWM, reset to the current RSS just before) after ``fn()``,
    less the RSS before it (getrusage's ru_maxrss cannot be reset, hence a fresh process per measurement)."""
    gc.collect()
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no valid measurement") from e
    fn()
    return _status_bytes("VmHWM") - before


def measure(spec: ModelSpec) -> dict[str, int]:
    """Peak-RSS increase of each phase in this process (bytes); run it in a fresh process."""
    set_threads(1)
    try:  # what MALLOC_MMAP_THRESHOLD_ in run_child's environment does, for this already running process
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    overrides = dict(num_sampling_steps=1, rank=RANK, max_sequence_length=MAX_SEQUENCE_LENGTH)
    with fixed_round(spec, num_prompts=1, batch=BATCH, **overrides) as rnd:
        trainer, rollout = rnd.trainer, rnd.rollout
        calls = {
            "train": rnd.optimise,
            "sample": lambda: trainer.rollouts.record(rollout.prompts, rollout.indices, 0).latents,
            "decode": lambda: trainer.family.decode(rollout.latents),
        }
        out_bytes = {}
        for phase, call in calls.items():
            with torch.no_grad() if phase == "decode" else torch.enable_grad():
                call()  # warm-up: optimizer state, lazy initialisation
                out_bytes[phase] = peak_rss_increase(call)
    return out_bytes


def estimate(spec: ModelSpec) -> dict[str, int]:
    """The planner's estimates for the same phases, from the saved directory's configs on meta."""
    from orw_diffusers.memory import MemoryPlanner, PlanSettings, load_model_configs

    path = saved_pipeline(spec)
    planner = MemoryPlanner(load_model_configs(path))
    s = PlanSettings(model=path, resolution=spec.resolution, train_batch_size=BATCH, sample_batch_size=BATCH,
                     samples_per_process=BATCH, rank=RANK, mixed_precision="no", max_sequence_length=MAX_SEQUENCE_LENGTH,
                     guidance_scale=4.5, train_passes=("reference", "policy"), rewards=())  # fmt: skip
    return {"train": planner.train_step_peak(s), "sample": planner.sample_step_peak(s), "decode": planner.decode_peak(s)}


def run(quick: bool = False, reps: int = 3) -> Section:
    configs = QUICK_CONFIGS if quick else CONFIGS
    measured: dict[str, list[dict[str, int]]] = {name: [] for name in configs}
    for spec in configs.values():
        saved_pipeline(spec)  # built once, outside the children
    for _ in range(reps):
        for name in configs:
            if quick:  # in this process: enough to check that it runs
                measured[name].append(measure(configs[name]))
            else:
                measured[name].append(run_child("bench.planner_validation", ["--child", name]))
    mib = 1 / 2**20
    table = [["config", "phase", "planner estimate, MiB", "measured peak increase, MiB, median (min–max)", "error",
              "target", "met"]]  # fmt: skip
    labels = {"train": f"training micro-batch of {BATCH}", "sample": f"Euler step, batch {BATCH} (x2 CFG)",
              "decode": f"VAE decode of {BATCH}"}  # fmt: skip
    errors = []
    for name, spec in configs.items():
        est = estimate(spec)
        for phase in PHASES:
            m = Stat([r[phase] for r in measured[name]])
            error = est[phase] / m.median - 1 if m.median > 0 else float("nan")  # --quick: below page size
            errors.append(abs(error))
            table.append([name, labels[phase], f"{est[phase] * mib:.1f}", m.fmt(1, mib), f"{error:+.1%}",
                          f"±{TARGET:.0%}", "yes" if abs(error) <= TARGET else "**no**"])  # fmt: skip
    met = all(e <= TARGET for e in errors)
    notes = [
        f"fp32 on CPU, 1 thread, LoRA rank {RANK} on the attention projections, {MAX_SEQUENCE_LENGTH} zero T5 tokens + "
        f"77 CLIP tokens; every config has a dual-attention first layer and RMS q/k norm like SD3.5-Medium. "
        f"{reps} fresh processes per config.",
        "Measured = VmHWM − RSS before the call, with VmHWM reset just before it and glibc returning freed blocks "
        "of 4 KiB and more at once; the planner never sees the real model: it reads the saved directory's configs.",
        "The autocast emulation used for fp16/bf16 plans is not covered here (no GPU; CPU autocast uses other "
        "operator lists than CUDA's).",
        load_note(),
    ]
    return Section("Memory planner: estimate vs. measurement", "python -m bench.planner_validation", table, notes,
                   {"max_abs_error": max(errors), "errors": errors, "met": met})  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", choices=sorted(CONFIGS) + sorted(QUICK_CONFIGS), help="(internal) measure one, print JSON")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure({**CONFIGS, **QUICK_CONFIGS}[args.child])))
        return 0
    return run_main(run, __doc__, argv, default_reps=3, p=p)


if __name__ == "__main__":
    raise SystemExit(main())
