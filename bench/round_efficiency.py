"""Benchmark 3, round efficiency: wall time of a whole round against the model computations in it.

A round is ``Trainer.run_round`` + ``log`` (sample, decode, reward, weights, optimise, refresh,
metrics). Its model computations are timed alone with the round's shapes: the transformer forwards
of sampling (sampler adapter, no grad, CFG batch), VAE decodes, reward forwards, training forward +
backward, reference forwards (adapters off, no grad). Overhead = round / sum of those - 1. The
largest non-model costs are found with cProfile and then timed directly.

    python -m bench.round_efficiency [--quick] [--reps N]
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
from typing import Any, Callable, Optional, Sequence

import torch

from bench.common import (
    Section,
    Stat,
    Stopwatch,
    bench_spec,
    conv_reward,
    interleaved,
    ratios,
    run_main,
    saved_pipeline,
    timing_notes,
    trainer_for,
)

TARGET = 0.10

# Non-model functions to look for in the profile: (path suffix, function) -> label.
PROFILE_CANDIDATES = {
    ("orw_diffusers/lora.py", "reference"): "lora.reference: disable + re-enable every adapter",
    ("orw_diffusers/lora.py", "sampler_adapter"): "lora.sampler_adapter: switch to the sampler and back",
    ("orw_diffusers/lora.py", "copy_adapter"): "lora.copy_adapter: refresh the sampler",
    ("orw_diffusers/flow.py", "per_sample_noise"): "flow.per_sample_noise: one seeded generator per sample",
    ("orw_diffusers/flow.py", "sample_sigmas"): "flow.sample_sigmas",
    ("orw_diffusers/flow.py", "euler_step"): "flow.euler_step",
    ("orw_diffusers/loss.py", "orw_cfm_w2_loss"): "loss.orw_cfm_w2_loss",
    ("orw_diffusers/models/pipeline.py", "get"): "PromptCache.get",
    ("torch/optim/adam.py", "step"): "AdamW.step",
    ("torch/optim/adamw.py", "step"): "AdamW.step",
    ("accelerate/accelerator.py", "clip_grad_norm_"): "Accelerator.clip_grad_norm_",
    ("torch/optim/optimizer.py", "zero_grad"): "optimizer.zero_grad",
    ("orw_diffusers/trainer.py", "gather_global"): "trainer.gather_global",
    ("orw_diffusers/objectives/orw.py", "signal"): "objective.signal (the weights)",
    ("orw_diffusers/trainer.py", "round_metrics"): "trainer.round_metrics (incl. diversity, gathers)",
    ("orw_diffusers/run_log.py", "sample_grid"): "run_log.sample_grid (PNG)",
    ("orw_diffusers/run_log.py", "sample_rewards"): "run_log.sample_rewards",
    ("orw_diffusers/run_log.py", "metrics"): "run_log.metrics (metrics.jsonl)",
    ("tqdm/std.py", "__init__"): "tqdm bars",
}


def _profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Cumulative seconds of each PROFILE_CANDIDATES function over one call of ``fn``."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in pstats.Stats(profiler).stats.items():
        for (suffix, func), label in PROFILE_CANDIDATES.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                out[label] = out.get(label, 0.0) + cumulative
    return out


def run(quick: bool = False, reps: int = 5) -> Section:
    from orw_diffusers import lora
    from orw_diffusers.flow import interpolate, target_velocity

    spec = bench_spec(quick)
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(
            saved_pipeline(spec), out, resolution=spec.resolution, num_sampling_steps=4 if quick else 8
        )
        cfg, family, model = trainer.cfg, trainer.family, trainer.unwrapped
        n = trainer.sizes.samples_per_process
        sb, tb = cfg.sample_batch_size, cfg.train_batch_size
        steps = len(trainer.sampling_sigmas) - 1
        guidance = getattr(trainer, "sampling_guidance_scale", cfg.guidance_scale)
        cfg_factor = 2 if guidance > 1 else 1
        counts = {
            "sample_fwd": steps * (n // sb),
            "decode": n // sb,
            "reward": n // sb,
            "train_fwd_bwd": cfg.num_inner_epochs * (n // tb),
            "ref_fwd": cfg.num_inner_epochs * (n // tb) if cfg.w2_coefficient > 0 else 0,
        }
        rounds = [0]

        def one_round() -> None:
            metrics = trainer.run_round(rounds[0])
            trainer.log.metrics(metrics)
            rounds[0] += 1

        one_round()  # warm-up (and the first round's lazy initialisation)

        g = torch.Generator().manual_seed(0)
        prompts = trainer.round_prompts(0)
        x_s = torch.randn((sb * cfg_factor, *trainer.latent_shape), generator=g)
        sig_s = torch.full((sb * cfg_factor,), 0.5)
        cond_s = trainer.family.prompt_cache.get((prompts * sb)[: sb * cfg_factor], trainer.device)
        latents_dec = torch.randn((sb, *trainer.latent_shape), generator=g)
        images = family.decode(latents_dec)
        x1 = torch.randn((tb, *trainer.latent_shape), generator=g)
        noise = torch.randn(x1.shape, generator=g)
        sig_t = torch.rand(tb, generator=g)
        x_t, v_target = interpolate(x1, noise, sig_t), target_velocity(x1, noise)
        cond_t = trainer.family.prompt_cache.get((prompts * tb)[:tb], trainer.device)

        def sample_fwd() -> float:
            model.eval()
            with lora.sampler_adapter(model), Stopwatch() as sw:
                family.predict_velocity(model, x_s, sig_s, cond_s)
            return sw.seconds

        def decode() -> None:
            with torch.no_grad():
                family.decode(latents_dec)

        def reward() -> None:
            conv_reward(images, prompts[:sb])

        def train_fwd_bwd() -> None:
            trainer.transformer.train()
            v = family.predict_velocity(trainer.transformer, x_t, sig_t, cond_t)
            ((v.float() - v_target) ** 2).mean().backward()
            trainer.optimizer.zero_grad(set_to_none=True)

        def ref_fwd() -> float:
            with lora.reference(model), Stopwatch() as sw:
                family.predict_velocity(model, x_t, sig_t, cond_t)
            return sw.seconds

        parts = {
            "sample_fwd": sample_fwd,
            "decode": decode,
            "reward": reward,
            "train_fwd_bwd": train_fwd_bwd,
            "ref_fwd": ref_fwd,
        }
        times = interleaved({"round": one_round, **parts}, reps=reps, warmup=0)
        model_sums = [sum(counts[k] * times[k][r] for k in parts) for r in range(reps)]
        ratio = ratios(times["round"], model_sums)
        overhead = Stat([x - 1 for x in ratio.values])

        # where the rest goes: profile one round, then time the largest costs directly
        profiled = _profile(one_round)
        direct = _direct_costs(trainer, reps=3 if quick else 7)
    round_s = Stat(times["round"]).median
    met = overhead.median <= TARGET and round_s / Stat(model_sums).median - 1 <= TARGET
    table = [["computation", "calls per round", "seconds per call, median (min–max)", "seconds per round", "share"]]
    for k in parts:
        per_call = Stat(times[k])
        label = {
            "sample_fwd": f"transformer forward, sampling (batch {sb * cfg_factor}, sampler adapter)",
            "decode": f"VAE decode (batch {sb})",
            "reward": f"reward forward (batch {sb})",
            "train_fwd_bwd": f"training forward + backward (batch {tb})",
            "ref_fwd": f"reference forward (batch {tb}, no grad)",
        }[k]
        table.append(
            [
                label,
                str(counts[k]),
                per_call.fmt(4),
                f"{counts[k] * per_call.median:.2f}",
                f"{counts[k] * per_call.median / round_s:.1%}",
            ]
        )
    table.append(
        [
            "**sum of model computations**",
            "",
            "",
            f"{Stat(model_sums).median:.2f}",
            f"{Stat(model_sums).median / round_s:.1%}",
        ]
    )
    table.append(["**whole round** (run_round + log)", "1", Stat(times["round"]).fmt(3), f"{round_s:.2f}", "100%"])
    table.append(
        [
            f"**overhead** round / model sum − 1, per repetition (target ≤ {TARGET:.0%})",
            "",
            overhead.fmt(3),
            "",
            "met" if met else "**missed**",
        ]
    )
    of_medians = round_s / Stat(model_sums).median - 1
    table.append(
        [
            "overhead from the medians (round median / model-sum median − 1)",
            "",
            f"{of_medians:.3f}",
            "",
            "met" if of_medians <= TARGET else "**missed**",
        ]
    )

    ranked = sorted(direct.items(), key=lambda kv: -kv[1]["per_round"])
    notes = [
        f"{spec.describe()}; {n} samples per round ({cfg.prompts_per_round or len(trainer.prompts)} prompts x "
        f"{cfg.images_per_prompt}), sample_batch_size {sb}, {steps} Euler steps with CFG {guidance}, "
        f"train_batch_size {tb}, w2_coefficient {cfg.w2_coefficient}, LoRA rank {cfg.rank}, fp32, 1 thread; "
        f"{reps} repetitions, the round and each computation interleaved (order rotated).",
        "Largest non-model costs, each timed directly in isolation (median of repeated calls) and multiplied by its "
        "calls per round:",
    ]
    for rank, (name, d) in enumerate(ranked[:3], 1):
        notes.append(
            f"  {rank}. {name}: {d['per_call'] * 1000:.1f} ms x {d['calls']} = {d['per_round'] * 1000:.0f} ms "
            f"per round ({d['per_round'] / round_s:.1%})"
        )
    found = sorted(profiled.items(), key=lambda kv: -kv[1])[:8]
    notes.append(
        "cProfile of one round (deterministic profiling inflates Python-heavy code), cumulative seconds: "
        + "; ".join(f"{k} {v:.3f}" for k, v in found)
        + "."
    )
    notes += timing_notes()
    if not met:
        notes.append("Target missed: see the non-model costs above.")
    return Section(
        "Round efficiency",
        "python -m bench.round_efficiency",
        table,
        notes,
        {
            "overhead": overhead.median,
            "overhead_of_medians": of_medians,
            "round_s": round_s,
            "model_s": Stat(model_sums).median,
            "met": met,
            "top_costs": [[k, d["per_round"]] for k, d in ranked[:3]],
            "profile": found,
        },
    )


def _direct_costs(trainer, reps: int) -> dict[str, dict[str, float]]:
    """Seconds per call and per round of the non-model operations the profile points at."""
    from orw_diffusers import lora
    from orw_diffusers.flow import per_sample_noise, sample_sigmas

    cfg, model = trainer.cfg, trainer.unwrapped
    n = trainer.sizes.samples_per_process
    sb, tb = cfg.sample_batch_size, cfg.train_batch_size
    micro = cfg.num_inner_epochs * (n // tb)
    for p in trainer.params:  # optimizer step needs gradients
        p.grad = torch.zeros_like(p)

    def reference() -> None:
        with lora.reference(model):
            pass

    def sampler() -> None:
        with lora.sampler_adapter(model):
            pass

    def optimizer_step() -> None:
        for p in trainer.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        trainer.accelerator.clip_grad_norm_(trainer.params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=False)

    idx_s, idx_t = torch.arange(sb), torch.arange(tb)
    ops = {
        "lora.reference (disable + re-enable all adapters), per micro-batch": (
            reference,
            micro if cfg.w2_coefficient > 0 else 0,
        ),
        "lora.sampler_adapter (switch adapters and back), per sample batch": (sampler, n // sb),
        "lora.copy_adapter (sampler refresh), per round": (lambda: lora.copy_adapter(model), 1),
        "clip + AdamW step + zero_grad, per micro-batch": (optimizer_step, micro),
        "per-sample seeded noise, per sample batch": (
            lambda: per_sample_noise(trainer.latent_shape, 0, (0, 0), idx_s),
            n // sb,
        ),
        "per-sample seeded noise + sigmas, per micro-batch": (
            lambda: (
                per_sample_noise(trainer.latent_shape, 0, (0, 1, 0), idx_t),
                sample_sigmas("uniform", 0, (0, 2, 0), idx_t),
            ),
            micro,
        ),
    }
    out = {}
    for name, (fn, calls) in ops.items():
        times = interleaved({name: fn}, reps=reps, warmup=1)[name]
        out[name] = {"per_call": Stat(times).median, "calls": calls, "per_round": Stat(times).median * calls}
    for p in trainer.params:
        p.grad = None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(run, __doc__, argv, default_reps=7)


if __name__ == "__main__":
    raise SystemExit(main())
