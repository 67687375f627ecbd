"""Benchmark 5, text encoders: text-encoder calls per round with the prompt cache against without it.

With the cache: a real ``Trainer`` (64 prompts x 4 images), whose ``PromptCache`` encodes every
unique prompt and the negative prompt once, before the text encoders are released. Without it: the
loop a naive trainer would run on the same round, encoding each sample batch's prompts and its
negative prompts for classifier-free guidance (as ``StableDiffusion3Pipeline.__call__`` does), and
each training micro-batch's prompts again. Both count ``family.text_encoder_calls`` (prompts
encoded). The counts do not depend on the model size, so the small test pipeline is used.

    python -m bench.text_encoder_calls [--quick]
"""

from __future__ import annotations

import tempfile
from typing import Optional, Sequence

import torch

from bench.common import QUICK, Section, emit, parser, prompts, run_config, saved_pipeline, set_threads

NUM_PROMPTS, IMAGES_PER_PROMPT = 64, 4


def run(quick: bool = False, reps: int = 1) -> Section:
    from bench.common import conv_reward
    from orw_diffusers.config import TrainConfig
    from orw_diffusers.models import LoadOptions, load_family
    from orw_diffusers.trainer import Trainer

    set_threads(1)
    path = saved_pipeline(QUICK)
    rounds = 1 if quick else 2
    train_prompts = prompts(NUM_PROMPTS)
    sample_bs, train_bs = 32, 32
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            **run_config(
                path,
                out,
                resolution=QUICK.resolution,
                prompts=train_prompts,
                images_per_prompt=IMAGES_PER_PROMPT,
                sample_batch_size=sample_bs,
                train_batch_size=train_bs,
                num_sampling_steps=1,
                num_epochs=rounds,
            )
        )
        trainer = Trainer(cfg, reward_fn=conv_reward)
        at_start = trainer.family.text_encoder_calls
        per_round_cached = []
        for r in range(rounds):
            before = trainer.family.text_encoder_calls
            trainer.log.metrics(trainer.run_round(r))
            per_round_cached.append(trainer.family.text_encoder_calls - before)
        samples = trainer.sizes.samples_per_process

    # the naive loop over the same round: encode whatever each batch needs, every time
    family = load_family(LoadOptions(path, load_t5=False, max_sequence_length=cfg.max_sequence_length), torch.float32)
    sample_prompts = [train_prompts[i % NUM_PROMPTS] for i in range(samples)]
    naive = {"sampling: prompts": 0, "sampling: negative prompt (CFG)": 0, "training: prompts": 0}
    with torch.no_grad():
        for start in range(0, samples, sample_bs):
            batch = sample_prompts[start : start + sample_bs]
            before = family.text_encoder_calls
            family.encode_prompts(batch, torch.device("cpu"))
            naive["sampling: prompts"] += family.text_encoder_calls - before
            before = family.text_encoder_calls
            family.encode_prompts([cfg.negative_prompt] * len(batch), torch.device("cpu"))
            naive["sampling: negative prompt (CFG)"] += family.text_encoder_calls - before
        for start in range(0, samples, train_bs):
            before = family.text_encoder_calls
            family.encode_prompts(sample_prompts[start : start + train_bs], torch.device("cpu"))
            naive["training: prompts"] += family.text_encoder_calls - before
    naive_total = sum(naive.values())
    cached_round = max(per_round_cached)
    table = [
        ["", "with the prompt cache (ours)", "without (naive loop)"],
        ["once, before training", f"{at_start} ({NUM_PROMPTS} prompts + the negative prompt)", "0"],
    ]
    for name, count in naive.items():
        table.append([f"per round, {name}", "0", str(count)])
    table.append(["**per round, total**", f"**{cached_round}**", f"**{naive_total}**"])
    table.append(["over 100 rounds", f"{at_start + 100 * cached_round}", f"{100 * naive_total}"])
    notes = [
        f"{NUM_PROMPTS} prompts x {IMAGES_PER_PROMPT} images = {samples} samples per round, sample_batch_size "
        f"{sample_bs}, train_batch_size {train_bs}; a call = one prompt through every text encoder "
        f"(family.text_encoder_calls). Measured over {rounds} real round(s) of Trainer.",
        f"Reduction per round: {naive_total} → {cached_round}; over 100 rounds "
        f"{100 * naive_total / max(at_start + 100 * cached_round, 1):.0f}x "
        f"fewer calls. After the cache is filled the text encoders are released (T5-XXL alone is ~9 GB in fp16).",
    ]
    return Section(
        "Text-encoder calls (prompt cache)",
        "python -m bench.text_encoder_calls",
        table,
        notes,
        {"cached_per_round": cached_round, "cached_once": at_start, "naive_per_round": naive_total},
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    emit(run(args.quick), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
