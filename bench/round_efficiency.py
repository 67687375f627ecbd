"""Benchmark 3, round efficiency: wall time of a whole round against the model computations in it.

A round is ``Trainer.run_round`` + ``log`` (sample, decode, reward, weights, optimise, refresh,
metrics). Its model computations are timed alone with the round's shapes: the transformer forwards
of sampling (sampler adapter, no grad, CFG batch), VAE decodes, reward forwards, training forward +
backward, reference forwards (adapters off, no grad). Overhead = round / sum of those - 1.

    python -m bench.round_efficiency [--quick] [--reps N]
"""

from __future__ import annotations

import tempfile
from typing import Optional, Sequence

import torch

from bench.common import (Section, Stat, Stopwatch, bench_spec, conv_reward, interleaved, model_passes, ratios, run_main,
                          saved_pipeline, timing_notes, trainer_for)  # fmt: skip

TARGET = 0.10


def run(quick: bool = False, reps: int = 5) -> Section:
    from orw_diffusers import lora

    spec = bench_spec(quick)
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(saved_pipeline(spec), out, resolution=spec.resolution, num_sampling_steps=4 if quick else 8)
        cfg, family, model = trainer.cfg, trainer.family, trainer.unwrapped
        n = trainer.sizes.samples_per_process
        sb, tb = cfg.sample_batch_size, cfg.train_batch_size
        steps = len(trainer.sampling_sigmas) - 1
        guidance = getattr(trainer, "sampling_guidance_scale", cfg.guidance_scale)
        cfg_factor = 2 if guidance > 1 else 1
        micro_batches = cfg.num_inner_epochs * (n // tb)
        counts = {"sample_fwd": steps * (n // sb), "decode": n // sb, "reward": n // sb, "train_fwd_bwd": micro_batches,
                  "ref_fwd": micro_batches if cfg.w2_coefficient > 0 else 0}  # fmt: skip
        rounds = [0]

        def one_round() -> None:
            trainer.log.metrics(trainer.run_round(rounds[0]))
            rounds[0] += 1

        one_round()  # warm-up (and the first round's lazy initialisation)

        g = torch.Generator().manual_seed(0)
        prompts = trainer.round_prompts(0)
        x_s = torch.randn((sb * cfg_factor, *trainer.latent_shape), generator=g)
        sig_s = torch.full((sb * cfg_factor,), 0.5)
        cond_s = family.prompt_cache.get((prompts * sb)[: sb * cfg_factor], trainer.device)
        latents_dec = torch.randn((sb, *trainer.latent_shape), generator=g)
        images = family.decode(latents_dec)
        train_fwd_bwd, ref_fwd = model_passes(trainer, torch.randn((tb, *trainer.latent_shape), generator=g),
                                              (prompts * tb)[:tb])  # fmt: skip

        def sample_fwd() -> float:
            model.eval()
            with lora.sampler_adapter(model), Stopwatch() as sw:
                family.predict_velocity(model, x_s, sig_s, cond_s)
            return sw.seconds

        def decode() -> None:
            with torch.no_grad():
                family.decode(latents_dec)

        parts = {"sample_fwd": sample_fwd, "decode": decode, "reward": lambda: conv_reward(images, prompts[:sb]),
                 "train_fwd_bwd": train_fwd_bwd, "ref_fwd": ref_fwd}  # fmt: skip
        times = interleaved({"round": one_round, **parts}, reps=reps, warmup=0)
    model_sums = [sum(counts[k] * times[k][r] for k in parts) for r in range(reps)]
    overhead = Stat([x - 1 for x in ratios(times["round"], model_sums).values])
    round_s, model_s = Stat(times["round"]).median, Stat(model_sums).median
    of_medians = round_s / model_s - 1
    met = overhead.median <= TARGET and of_medians <= TARGET
    labels = {
        "sample_fwd": f"transformer forward, sampling (batch {sb * cfg_factor}, sampler adapter)",
        "decode": f"VAE decode (batch {sb})", "reward": f"reward forward (batch {sb})",
        "train_fwd_bwd": f"training forward + backward (batch {tb})", "ref_fwd": f"reference forward (batch {tb}, no grad)",
    }  # fmt: skip
    table = [["computation", "calls per round", "seconds per call, median (min–max)", "seconds per round", "share"]]
    for k in parts:
        per_round = counts[k] * Stat(times[k]).median
        table.append([labels[k], str(counts[k]), Stat(times[k]).fmt(4), f"{per_round:.2f}", f"{per_round / round_s:.1%}"])
    table += [
        ["**sum of model computations**", "", "", f"{model_s:.2f}", f"{model_s / round_s:.1%}"],
        ["**whole round** (run_round + log)", "1", Stat(times["round"]).fmt(3), f"{round_s:.2f}", "100%"],
        [f"**overhead** round / model sum − 1, per repetition (target ≤ {TARGET:.0%})", "", overhead.fmt(3), "",
         "met" if met else "**missed**"],
        ["overhead from the medians (round median / model-sum median − 1)", "", f"{of_medians:.3f}", "",
         "met" if of_medians <= TARGET else "**missed**"],
    ]  # fmt: skip
    notes = [
        f"{spec.describe()}; {n} samples per round ({cfg.prompts_per_round or len(trainer.prompts)} prompts x "
        f"{cfg.images_per_prompt}), sample_batch_size {sb}, {steps} Euler steps with CFG {guidance}, "
        f"train_batch_size {tb}, w2_coefficient {cfg.w2_coefficient}, LoRA rank {cfg.rank}, fp32, 1 thread; "
        f"{reps} repetitions, the round and each computation interleaved (order rotated).",
        *timing_notes(),
    ]
    return Section("Round efficiency", "python -m bench.round_efficiency", table, notes,
                   {"overhead": overhead.median, "overhead_of_medians": of_medians, "round_s": round_s,
                    "model_s": model_s, "met": met})  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(run, __doc__, argv, default_reps=7)


if __name__ == "__main__":
    raise SystemExit(main())
