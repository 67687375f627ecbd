"""Shared pieces of the timing benchmarks (docs/benchmarks.md, ``python -m bench.run_all``): the scaled-down SD3
pipeline, timing, child processes and the sections. Nothing here downloads anything; the benchmark reward is
``bench/reward.py``, which training processes load by path."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from bench import REPO, markdown_table
from bench.reward import conv_reward
from orw_diffusers import tiny

MODEL_CACHE = os.environ.get("ORW_BENCH_CACHE", "/tmp/orw-bench-models")
WORDS = tiny.WORDS + ("tree", "house", "car")


# --- the benchmark model: an SD3 pipeline shaped like SD3.5 (16 latent channels, patch 2, RMS q/k norm, a
# dual-attention layer, CLIP tokens + zero T5 context), only narrower and shallower --------------------------
@dataclass(frozen=True)
class ModelSpec:
    layers: int = 4
    heads: int = 4
    head_dim: int = 64  # hidden size = heads * head_dim
    latent_size: int = 32  # latents are 16 x latent_size^2
    vae_blocks: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks: 8x upsampling, as SD3's VAE
    text_hidden: int = 64  # each CLIP; pooled = 2 * text_hidden
    tokenizer_length: int = 77
    dual_attention_layers: tuple[int, ...] = (0,)
    seed: int = 0

    @property
    def resolution(self) -> int:
        return self.latent_size * 2 ** (len(self.vae_blocks) - 1)

    def describe(self) -> str:
        return (f"SD3 transformer: {self.layers} layers, hidden {self.heads * self.head_dim} ({self.heads} heads x "
                f"{self.head_dim}), 16 x {self.latent_size}x{self.latent_size} latents (patch 2: "
                f"{(self.latent_size // 2) ** 2} image tokens), {self.resolution} px; VAE blocks {list(self.vae_blocks)}; "
                f"CLIP x2 hidden {self.text_hidden}")  # fmt: skip


BENCH = ModelSpec()
QUICK = ModelSpec(layers=1, heads=2, head_dim=16, latent_size=8, vae_blocks=(8, 16), text_hidden=16, tokenizer_length=16)


def saved_pipeline(spec: ModelSpec) -> str:
    """``save_pretrained`` directory of a ``StableDiffusion3Pipeline`` without T5 built to ``spec`` by
    ``orw_diffusers.tiny``, built once per spec (under /tmp)."""
    path = os.path.join(MODEL_CACHE, hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12])
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        tiny.sd3_pipeline(
            words=WORDS, resolution=spec.resolution, vae_blocks=spec.vae_blocks, text_hidden=spec.text_hidden,
            model_max_length=spec.tokenizer_length, transformer_layers=spec.layers, attention_head_dim=spec.head_dim,
            num_attention_heads=spec.heads, latent_channels=16, patch_size=2, joint_attention_dim=spec.heads * spec.head_dim,
            qk_norm="rms_norm", dual_attention_layers=tuple(i for i in spec.dual_attention_layers if i < spec.layers),
            vae_norm_groups=min(16, spec.vae_blocks[0]), seed=spec.seed,
        ).save_pretrained(tmp)  # fmt: skip
        os.makedirs(MODEL_CACHE, exist_ok=True)
        with contextlib.suppress(OSError):  # another process saved it first
            os.rename(tmp, path)
    return path


def prompts(n: int) -> list[str]:
    colours, things = ("red", "blue", "bright", "dark"), ("cat", "dog", "tree", "house", "car")
    return [f"a photo of a {colours[i % 4]} {things[(i // 4) % 5]} {i}" for i in range(n)]


def run_config(model_path: str, output_dir: str, **overrides: Any) -> dict:
    """A run config for the benchmark model; the reward is ``bench/reward.py:conv_reward``."""
    return dict(
        pretrained_model_name_or_path=model_path, output_dir=output_dir, load_t5=False, max_sequence_length=32,
        resolution=BENCH.resolution, prompts=prompts(4), images_per_prompt=2, sample_batch_size=4,
        train_batch_size=2, num_epochs=1, num_sampling_steps=8, guidance_scale=4.5, rank=16, learning_rate=1e-4,
        w2_coefficient=1.0, reward=f"{os.path.join(REPO, 'bench', 'reward.py')}:conv_reward", seed=0,
    ) | overrides  # fmt: skip


def trainer_for(model_path: str, output_dir: str, **overrides: Any):
    """A ``Trainer`` on the benchmark pipeline with the conv reward."""
    from orw_diffusers.config import TrainConfig
    from orw_diffusers.trainer import Trainer

    return Trainer(TrainConfig(**run_config(model_path, output_dir, **overrides)), reward_fn=conv_reward)


@dataclass
class FixedRound:
    """A trainer with one round of random latents (sampling is not what is measured) and unit weights."""

    trainer: Any  # Trainer
    rollout: Any  # Rollout of this process's samples

    def optimise(self) -> dict[str, torch.Tensor]:
        from orw_diffusers.objectives import Signal

        return self.trainer.optimise(self.rollout, Signal(torch.ones(len(self.rollout.indices))), 0)


@contextlib.contextmanager
def fixed_round(spec: ModelSpec, num_prompts: int, batch: int = 2, **overrides: Any) -> Iterator[FixedRound]:
    """``trainer_for`` on ``spec``'s saved pipeline in a temporary output directory: ``num_prompts`` prompts x
    ``batch`` images, sampled and trained in batches of ``batch`` (one micro-batch per prompt)."""
    from orw_diffusers.trainer import Rollout

    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(saved_pipeline(spec), out, resolution=spec.resolution, prompts=prompts(num_prompts),
                              images_per_prompt=batch, sample_batch_size=batch, train_batch_size=batch, **overrides)
        indices, round_prompts = trainer.local_indices(), trainer.sample_prompts(0)
        n = len(indices)
        latents = torch.randn((n, *trainer.latent_shape), generator=torch.Generator().manual_seed(0))
        yield FixedRound(trainer, Rollout(latents=latents.to(trainer.device, trainer.weight_dtype), extras={},
                                          prompts=[round_prompts[int(i)] for i in indices], indices=indices,
                                          rewards=torch.zeros(n), components={}, num_nonfinite=0,
                                          images=torch.zeros(0, 3, 1, 1)))  # fmt: skip


def model_passes(trainer: Any, latents: torch.Tensor, batch_prompts: list[str], seed: int = 1) -> tuple[Callable, Callable]:
    """One micro-batch's passes through the trained model, each to be timed alone: (training forward + backward,
    reference forward with the adapters off and no grad). The reference returns the seconds of its forward only:
    switching the adapters off and on is our code's cost, not the floor's."""
    from orw_diffusers import lora
    from orw_diffusers.flow import interpolate, target_velocity

    family, g = trainer.family, torch.Generator().manual_seed(seed)
    noise, sigmas = torch.randn(latents.shape, generator=g).to(latents.dtype), torch.rand(len(latents), generator=g)
    x_t, v_target = interpolate(latents, noise, sigmas), target_velocity(latents, noise)
    cond = family.prompt_cache.get(batch_prompts, trainer.device)

    def forward_backward() -> None:
        trainer.transformer.train()
        ((family.predict_velocity(trainer.transformer, x_t, sigmas, cond).float() - v_target) ** 2).mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    def reference_forward() -> float:
        with lora.reference(trainer.unwrapped), Stopwatch() as sw:
            family.predict_velocity(trainer.unwrapped, x_t, sigmas, cond)
        return sw.seconds

    return forward_backward, reference_forward


# --- timing ------------------------------------------------------------------------------------------------
def set_threads(n: int = 1) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def bench_spec(quick: bool) -> ModelSpec:
    """The model of a timing benchmark (``QUICK`` with --quick), with torch set to one thread."""
    set_threads(1)
    return QUICK if quick else BENCH


# The machine these benchmarks were written on is shared with other jobs, so they time CPU seconds of this process
# (with one thread, the work done, not the waiting for a core); the two-process benchmark uses wall time.
CLOCK_NOTE = ("Times are CPU seconds of the benchmark process (time.process_time; 1 thread), which other jobs on the "
              "machine disturb less than wall time.")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (CPU seconds of this process)."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.process_time() - self.start


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each variant per repetition. Variants run one after another within a repetition and the order
    rotates between repetitions, so slow drifts of a shared machine hit all alike. A variant that returns a float
    has timed its own core (e.g. a forward pass inside a context whose entry and exit are not the measured work)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            with Stopwatch() as sw:
                result = variants[name]()
            times[name].append(result if isinstance(result, float) else sw.seconds)
    return times


@dataclass
class Stat:
    """Median and spread (min, max) of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        v = [x * scale for x in self.values]
        return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def ratios(num: Sequence[float], den: Sequence[float]) -> Stat:
    """Per-repetition ratios (paired), so a slow repetition of the machine cancels out."""
    return Stat([a / b for a, b in zip(num, den)])


# --- child processes ---------------------------------------------------------------------------------------
# glibc serves every block of at least this many bytes by mmap and unmaps it when freed. At 64 KiB the small
# tensors of the smallest planner config still came from (and went back to) the heap and were missed by up
# to 0.6 MiB; at 4 KiB RSS follows the live tensors to within a page.
MMAP_THRESHOLD = 4096


def child_env(threads: int = 1, measure_memory: bool = False) -> dict[str, str]:
    """Environment of a benchmark's child: ``threads`` threads, no Hub; ``measure_memory``: glibc returns every
    freed block of 4 KiB and more to the OS at once, so RSS follows the live tensors instead of the allocator's
    cached free memory (its adaptive threshold would otherwise keep large freed blocks)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MALLOC_MMAP_THRESHOLD_")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    if measure_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def run_child(module: str, args: Sequence[str], timeout: int = 900) -> dict:
    """``python -m <module> <args>`` in a fresh memory-measuring process; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=child_env(measure_memory=True), timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- reporting ---------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One benchmark's part of docs/benchmarks.md."""

    title: str
    command: str
    table: list[list[str]]  # first row: header
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # the headline numbers, for tests and JSON

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Reproduce: `{self.command}`", "", *markdown_table(self.table)]
        if self.notes:
            lines += [""] + [note if note.startswith(("-", " ")) else f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def machine_info() -> str:
    import diffusers

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    memory = float("nan")
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        memory = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, no GPU, shared with other jobs (each section notes "
            f"the load average during its run); Python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}; {datetime.date.today().isoformat()}")


def load_note() -> str:
    load = os.getloadavg()
    return f"machine load average during this benchmark: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} cores"


def timing_notes() -> list[str]:
    """The last notes of a timing benchmark: which clock, and how loaded the machine was."""
    return [CLOCK_NOTE, load_note()]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repetition: checks that it runs (tests)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 5; 1 with --quick)")
    p.add_argument("--json", default=None, help="also write the section as JSON to this file")
    return p


def run_main(run: Callable[[bool, int], Section], doc: str, argv: Optional[Sequence[str]], default_reps: int,
             p: Optional[argparse.ArgumentParser] = None) -> int:  # fmt: skip
    """A benchmark's ``main``: parse the common options (``p``: with the benchmark's own), ``run(quick, reps)``,
    print (and save) the section."""
    args = (p or parser(doc.splitlines()[0])).parse_args(argv)
    section = run(args.quick, args.reps or (1 if args.quick else default_reps))
    print(section.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(section), f, indent=1)
    return 0
