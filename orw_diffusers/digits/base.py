"""The digits base: build it (VAE, transformer, reward CNN) into the cache, load it, sample it.

Cache layout (``$ORW_DIFFUSERS_CACHE``, default ``~/.cache/orw_diffusers``)::

    <cache>/digits-sd3-v2/                    the pipeline (model_index.json, transformer/, vae/, text_encoder*/, ...)
    <cache>/digits-sd3-v2/classifiers/        the reward CNN (reward_cnn.safetensors + reward_cnn.json)
    <cache>/digits-sd3-v2/digits_build.json   how it was built (seed, settings, split, build time)
    <cache>/digits-sd3-v2.lock                held by the one process that builds it

The classifiers sit inside the pipeline folder (``from_pretrained`` ignores folders that
``model_index.json`` does not name) so that one ``os.rename`` publishes the whole build atomically.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .classifier import save_reward_classifier, train_reward_classifier
from .data import (
    BASE_NAME,
    CLASSIFIER_DIR,
    DIGITS_GUIDANCE_SCALE,
    DIGITS_MAX_SEQUENCE_LENGTH,
    DIGITS_NUM_STEPS,
    DIGITS_RESOLUTION,
    DIGITS_TOKENIZER_MAX_LENGTH,
    DIGITS_WORDS,
    GENERIC_PROMPT,
    HELDOUT_FRACTION,
    NEGATIVE_PROMPT,
    SPLIT_SEED,
    build_once,
    digits_cache_dir,
    load_digit_images,
    specific_prompt,
)


@dataclass(frozen=True)
class BuildSettings:
    """Sizes and step counts of a build; ``BuildSettings.mini()`` is a seconds-long plumbing build for tests."""

    vae_blocks: tuple[int, ...] = (16, 32)  # one downsample: 16x16x3 images -> 8x8x4 latents
    vae_steps: int = 200
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4  # small: we want sharp reconstructions, the KL only keeps the latents smooth
    text_hidden: int = 16
    layers: int = 4
    heads: int = 4
    head_dim: int = 32  # width 128: at width 64 the generic prompt over-produced "8" (18% of samples)
    patch_size: int = 2
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.995
    negative_share: float = 0.1  # the "" prompt, CFG's unconditional branch
    generic_share: float = 0.6  # the rest of the mix asks for the sample's own digit
    classifier_epochs: int = 40

    @classmethod
    def mini(cls) -> "BuildSettings":
        return cls(vae_blocks=(4, 8), vae_steps=3, text_hidden=8, layers=1, heads=2, head_dim=4, steps=3,
                   batch_size=16, classifier_epochs=1)


def _build_pipeline_parts(settings: BuildSettings, seed: int):
    """Untrained pipeline components from ``tiny``: tokenizers, text encoders, VAE, transformer, scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .. import tiny

    tokenizer = tiny.clip_tokenizer(DIGITS_WORDS, DIGITS_TOKENIZER_MAX_LENGTH)
    hidden = settings.text_hidden
    blocks = settings.vae_blocks
    return StableDiffusion3Pipeline(
        transformer=tiny.sd3_transformer(
            sample_size=DIGITS_RESOLUTION // 2 ** (len(blocks) - 1), num_layers=settings.layers,
            num_attention_heads=settings.heads, attention_head_dim=settings.head_dim, joint_attention_dim=2 * hidden,
            pooled_projection_dim=2 * hidden, patch_size=settings.patch_size, seed=seed + 3,
        ),
        # shift 1: with only 8x8x4 latents there is no high-resolution signal-to-noise argument for shifting.
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=tiny.vae(block_out_channels=blocks, norm_num_groups=min(8, blocks[0]), sample_size=DIGITS_RESOLUTION, seed=seed + 4),
        text_encoder=tiny.clip_text_encoder(len(tokenizer), hidden, DIGITS_TOKENIZER_MAX_LENGTH, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=tiny.clip_text_encoder(len(tokenizer), hidden, DIGITS_TOKENIZER_MAX_LENGTH, seed=seed + 2),
        tokenizer_2=tiny.clip_tokenizer(DIGITS_WORDS, DIGITS_TOKENIZER_MAX_LENGTH),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _train_vae(vae, images: torch.Tensor, settings: BuildSettings, bar) -> None:
    """Reconstruction + tiny KL; images: [N, 3, 16, 16] in [-1, 1]. Trains ``vae`` in place, leaves it in eval mode."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    for _ in range(settings.vae_steps):
        batch = images[torch.randint(len(images), (settings.batch_size,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl_per_dim = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(recon, batch) + settings.vae_kl_weight * kl_per_dim
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix_str(f"vae mse {loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)


def _train_transformer(pipe, latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor,
                       settings: BuildSettings, bar):
    """Plain conditional flow matching on scaled VAE latents; returns the EMA copy of the transformer.

    latent_mean/latent_std: the VAE posterior per training image, [N, 4, 8, 8] (already shifted and scaled).
    Prompt mix: ``""`` (negative_share), the generic prompt (generic_share), else the image's own digit.
    """
    prompts = [NEGATIVE_PROMPT, GENERIC_PROMPT] + [specific_prompt(d) for d in range(10)]
    with torch.no_grad():  # exactly what the pipeline feeds the transformer at inference
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH
        )  # [12, 8 + max_seq_len, 2*hidden], [12, 2*hidden]
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    # 100 warm-up steps, then a cosine decay to 10%: the late low-lr steps sharpen the generic prompt's samples
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / 100) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(k, settings.steps) / settings.steps))))
    for step in range(settings.steps):
        idx = torch.randint(len(labels), (settings.batch_size,))
        # a fresh posterior sample every time: the model learns the latents the VAE decoder actually accepts
        latents = latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_mean[idx])
        u = torch.rand(settings.batch_size)
        prompt_idx = torch.where(u < settings.negative_share, 0,
                                 torch.where(u < settings.negative_share + settings.generic_share, 1, 2 + labels[idx]))
        sigmas = torch.rand(settings.batch_size)  # diffusers convention: 1 = noise
        noise = torch.randn_like(latents)
        s = sigmas.view(-1, 1, 1, 1)
        v_pred = model(hidden_states=(1 - s) * latents + s * noise, encoder_hidden_states=prompt_embeds[prompt_idx],
                       pooled_projections=pooled_embeds[prompt_idx], timestep=sigmas * 1000, return_dict=False)[0]
        loss = F.mse_loss(v_pred, noise - latents)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA with a warm-up, so early averages are not dominated by the random init
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        bar.update(1)
        bar.set_postfix_str(f"flow loss {loss.item():.3f}", refresh=False)
    return ema


def build_digits_base(out_dir: str, seed: int = 0, mini: bool = False, progress: bool = True,
                      settings: Optional[BuildSettings] = None) -> str:
    """Train the digits base (VAE, transformer, reward classifier) and save it to ``out_dir``.

    ``mini=True`` builds the seconds-long plumbing version; ``settings`` overrides both (for studies).
    Writes to a temporary sibling folder and renames it at the end, so ``out_dir`` either does not exist
    or is complete. If another process published ``out_dir`` meanwhile, ours is discarded. Returns ``out_dir``.
    """
    from ..progress import progress_bar

    settings = settings or (BuildSettings.mini() if mini else BuildSettings())
    start = time.time()
    torch.manual_seed(seed)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the published cache should read like any other
    try:
        images, labels = load_digit_images("train")
        pipe = _build_pipeline_parts(settings, seed)
        total = settings.vae_steps + settings.steps + settings.classifier_epochs
        with progress_bar(total=total, desc="building digits base", enabled=progress) as bar:
            _train_vae(pipe.vae, images * 2 - 1, settings, bar)
            with torch.no_grad():
                posterior = pipe.vae.encode(images * 2 - 1).latent_dist  # [N, 4, 8, 8]
                # SD3 decodes `latents / scaling_factor + shift_factor`: pick both so scaled latents are ~N(0, 1)
                shift = posterior.mean.mean().item()
                scale = 1.0 / (posterior.mean - shift).std().item()
                pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
                recon = (pipe.vae.decode(posterior.mean).sample / 2 + 0.5).clamp(0, 1)
            ema = _train_transformer(pipe, (posterior.mean - shift) * scale, posterior.std * scale, labels, settings, bar)
            pipe.transformer = ema
            # the reward classifier sees what the pipeline decodes (reconstructions) as well as real digits
            classifier = train_reward_classifier(torch.cat([images, recon]), torch.cat([labels, labels]),
                                                 epochs=settings.classifier_epochs, seed=seed, on_epoch=lambda: bar.update(1))
            heldout, heldout_labels = load_digit_images("heldout")
            with torch.no_grad():  # only recorded in digits_build.json: the held-out split trains nothing
                accuracy = (classifier(heldout).argmax(1) == heldout_labels).double().mean().item()
        pipe.save_pretrained(tmp_dir)
        save_reward_classifier(classifier, os.path.join(tmp_dir, CLASSIFIER_DIR))
        info = {"seed": seed, "mini": mini, "settings": asdict(settings), "build_seconds": round(time.time() - start, 1),
                "heldout_fraction": HELDOUT_FRACTION, "split_seed": SPLIT_SEED,
                "max_sequence_length": DIGITS_MAX_SEQUENCE_LENGTH, "reward_classifier_heldout_accuracy": round(accuracy, 4)}
        with open(os.path.join(tmp_dir, "digits_build.json"), "w") as f:
            json.dump(info, f, indent=2)
        try:
            os.rename(tmp_dir, out_dir)  # atomic publish
        except OSError:
            if not _is_complete(out_dir):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)  # another process won the race; its build is as good
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _is_complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in ("model_index.json", "digits_build.json", CLASSIFIER_DIR))


def ensure_digits_base(cache_dir: Optional[str] = None, seed: int = 0, progress: bool = True) -> str:
    """The path of the cached base pipeline ``<cache>/digits-sd3-v2``; builds it first if it is missing.

    One process builds (under a lock on ``<cache>/digits-sd3-v2.lock``); others started meanwhile wait and
    reuse it. Leftover ``digits-sd3-v2.tmp-*`` folders of interrupted builds are never used.
    A base built with another seed is not detected: use another ``cache_dir`` for other seeds.
    """
    path = os.path.join(digits_cache_dir(cache_dir), BASE_NAME)
    return build_once(path, _is_complete, lambda: build_digits_base(path, seed=seed, progress=progress))


def load_digits_pipeline(path: Optional[str] = None, device: str | torch.device = "cpu"):
    """``StableDiffusion3Pipeline.from_pretrained`` of ``path`` (default: the cached base, built if missing)."""
    from diffusers import StableDiffusion3Pipeline

    from ..models.pipeline import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(path or ensure_digits_base(), StableDiffusion3Pipeline)
    return pipe.to(device)


@torch.no_grad()
def generate_digits(pipe, prompts: list[str], seed: int = 0, batch_size: int = 250,
                    num_inference_steps: int = DIGITS_NUM_STEPS, guidance_scale: float = DIGITS_GUIDANCE_SCALE) -> torch.Tensor:
    """Sample one image per prompt with the plain pipeline ``__call__``; returns float[N, 3, 16, 16] in [0, 1] on CPU."""
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunks.append(pipe(prompts[start:start + batch_size], num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH,
                           output_type="pt", generator=generator).images.float().cpu())
    return torch.cat(chunks)
