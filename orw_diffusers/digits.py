"""The "digits" base model: a real ``StableDiffusion3Pipeline`` trained on CPU on scikit-learn's 8x8 digits.

This is the miniature of the ORW-CFM-W2 paper's MNIST "only even digits" experiment. The base is built
once (a few minutes on two CPU cores), saved with ``save_pretrained`` and afterwards loaded like any SD3
checkpoint::

    path = ensure_digits_base()  # <cache>/digits-sd3-v2/, built only if missing
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    images = pipe(GENERIC_PROMPT, num_inference_steps=DIGITS_NUM_STEPS, guidance_scale=DIGITS_GUIDANCE_SCALE,
                  max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH, output_type="pt").images  # [B, 3, 16, 16]

Cache layout (``$ORW_DIFFUSERS_CACHE``, default ``~/.cache/orw_diffusers``)::

    <cache>/digits-sd3-v2/                    the pipeline (model_index.json, transformer/, vae/, text_encoder*/, ...)
    <cache>/digits-sd3-v2/classifiers/        the reward CNN (reward_cnn.safetensors + reward_cnn.json)
    <cache>/digits-sd3-v2/digits_build.json   how it was built (seed, settings, split, build time)

The classifiers sit inside the pipeline folder (``from_pretrained`` ignores folders that
``model_index.json`` does not name) so that one ``os.rename`` publishes the whole build atomically.

Data: ``sklearn.datasets.load_digits`` (1,797 images, 0..16), upscaled bilinearly to 16x16, grey -> 3 channels.
A stratified 20% held-out split (fixed seed, independent of the build seed) trains nothing; it only
calibrates the evaluation ("how confident is the judge on real digits?").
"""

from __future__ import annotations

import argparse
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

DIGITS_RESOLUTION = 16
# Without T5, encode_prompt pads the context with `max_sequence_length` zero tokens; the diffusers default
# (256) would dwarf the 16 image tokens. Use this value in training and in every pipeline call.
DIGITS_MAX_SEQUENCE_LENGTH = 2
# "<bos> a handwritten digit 7 <eos>" is exactly 6 tokens; every context token costs as much as an image token
DIGITS_TOKENIZER_MAX_LENGTH = 6
DIGITS_WORDS = ("a", "handwritten", "digit") + tuple(str(d) for d in range(10))
GENERIC_PROMPT = "a handwritten digit"
NEGATIVE_PROMPT = ""
DIGITS_GUIDANCE_SCALE = 2.0
DIGITS_NUM_STEPS = 20
BASE_NAME = "digits-sd3-v2"
CLASSIFIER_DIR = "classifiers"
CONFIDENCE_THRESHOLD = 0.9
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0  # the held-out split never changes with the build seed
EVEN_DIGITS = (0, 2, 4, 6, 8)


def specific_prompt(digit: int) -> str:
    """The prompt that asks for one digit, e.g. ``"a handwritten digit 7"``."""
    return f"{GENERIC_PROMPT} {int(digit)}"


def digits_cache_dir(cache_dir: Optional[str] = None) -> str:
    """``cache_dir``, else ``$ORW_DIFFUSERS_CACHE``, else ``~/.cache/orw_diffusers``."""
    return cache_dir or os.environ.get("ORW_DIFFUSERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "orw_diffusers")


def load_digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` in {"train", "heldout"} -> (images float[N, 3, 16, 16] in [0, 1], labels long[N])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    data = load_digits()
    train_idx, heldout_idx = train_test_split(
        range(len(data.target)), test_size=HELDOUT_FRACTION, stratify=data.target, random_state=SPLIT_SEED
    )
    idx = torch.as_tensor(train_idx if split == "train" else heldout_idx)
    pixels = torch.as_tensor(data.images, dtype=torch.float32)[idx, None] / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(pixels, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1), torch.as_tensor(data.target)[idx].long()


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

    from . import tiny

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
    from tqdm.auto import tqdm

    from .rewards.digits import save_reward_classifier, train_reward_classifier

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
        with tqdm(total=total, desc="building digits base", disable=not progress) as bar:
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

    Leftover ``digits-sd3-v2.tmp-*`` folders of interrupted builds are never used.
    A base built with another seed is not detected: use another ``cache_dir`` for other seeds.
    """
    path = os.path.join(digits_cache_dir(cache_dir), BASE_NAME)
    if not _is_complete(path):
        build_digits_base(path, seed=seed, progress=progress)
    return path


def load_digits_pipeline(path: Optional[str] = None, device: str | torch.device = "cpu"):
    """``StableDiffusion3Pipeline.from_pretrained`` of ``path`` (default: the cached base, built if missing)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path or ensure_digits_base(), text_encoder_3=None, tokenizer_3=None)
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


_EVAL_CLASSIFIER = None


def eval_classifier():
    """The judge: an RBF SVC (calibrated probabilities) on 8x8 grey pixels of the training split.

    A different model family from the reward CNN and never seen by fine-tuning. Fitting takes about a second
    and is deterministic, so it is refitted once per process instead of being pickled into the cache.
    """
    global _EVAL_CLASSIFIER
    if _EVAL_CLASSIFIER is None:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        images, labels = load_digit_images("train")
        _EVAL_CLASSIFIER = CalibratedClassifierCV(SVC(gamma=0.001), ensemble=False).fit(_svc_features(images), labels.numpy())
    return _EVAL_CLASSIFIER


def _svc_features(images: torch.Tensor):
    """[B, 3, 16, 16] in [0, 1] -> numpy [B, 64] on sklearn's 0..16 scale (grey, 2x2 average pooled)."""
    return (F.avg_pool2d(images.float().cpu().mean(1, keepdim=True), 2).flatten(1) * 16).numpy()


def _confident_share(probs: torch.Tensor) -> float:
    return (probs.max(1).values >= CONFIDENCE_THRESHOLD).float().mean().item()


def judge_probs(images: torch.Tensor) -> torch.Tensor:
    """The judge's class probabilities, float64[B, 10]. images: float[B, 3, 16, 16] in [0, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        raise ValueError(f"images must be [B, 3, {DIGITS_RESOLUTION}, {DIGITS_RESOLUTION}], got {tuple(images.shape)}")
    return torch.as_tensor(eval_classifier().predict_proba(_svc_features(images)))


def subset_entropy(histogram: torch.Tensor, classes: tuple[int, ...] = EVEN_DIGITS) -> float:
    """Entropy in nats of a 10-class histogram restricted to ``classes`` and renormalised (max ln 5 = 1.609 for
    five classes; 0 if they hold nothing). The demo's "even-class entropy" is the default."""
    part = histogram.double()[list(classes)]
    total = part.sum()
    if total <= 0:
        return 0.0
    q = part[part > 0] / total
    return max(0.0, float(-(q * q.log()).sum()))  # never -0.0


def evaluate_images(images: torch.Tensor) -> dict:
    """Judge samples with the evaluation classifier. images: float[B, 3, 16, 16] in [0, 1].

    Returns ``histogram`` (10 class fractions), ``p_even`` (fraction classified even), ``even_entropy``
    (entropy in nats of the class distribution restricted to even classes; max ln 5 = 1.609),
    ``confident_share`` (max-prob >= CONFIDENCE_THRESHOLD), ``real_confident_share`` (the same on the
    real held-out digits) and ``relative_confident_share`` (their ratio: confidence is relative to the judge).
    """
    probs = judge_probs(images)
    heldout, _ = load_digit_images("heldout")
    real_share = _confident_share(judge_probs(heldout))
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    share = _confident_share(probs)
    return {"histogram": [round(h, 4) for h in histogram.tolist()], "p_even": histogram[0::2].sum().item(),
            "even_entropy": subset_entropy(histogram), "num_samples": len(probs),
            "confident_share": share, "real_confident_share": real_share, "relative_confident_share": share / real_share}


def evaluate_base(path: Optional[str] = None, num_generic: int = 1000, num_per_digit: int = 100, seed: int = 0) -> dict:
    """Base-quality report: the generic prompt's ``evaluate_images`` plus per-digit accuracy of specific prompts."""
    pipe = load_digits_pipeline(path)
    report = {"generic": evaluate_images(generate_digits(pipe, [GENERIC_PROMPT] * num_generic, seed=seed))}
    prompts = [specific_prompt(d) for d in range(10) for _ in range(num_per_digit)]
    predicted = judge_probs(generate_digits(pipe, prompts, seed=seed + 1)).argmax(1)
    correct = predicted.view(10, num_per_digit) == torch.arange(10).view(10, 1)
    report["specific_accuracy"] = [round(a, 4) for a in correct.double().mean(1).tolist()]
    report["specific_accuracy_mean"] = correct.double().mean().item()
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orw_diffusers.digits", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the base into the cache (no-op if it is there)")
    build.add_argument("--cache-dir", default=None, help="default: $ORW_DIFFUSERS_CACHE or ~/.cache/orw_diffusers")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="delete and rebuild an existing base")
    evaluate = sub.add_parser("evaluate", help="print the base-quality report")
    evaluate.add_argument("--path", default=None, help="a pipeline folder (default: the cached base)")
    evaluate.add_argument("--num-samples", type=int, default=1000, help="generic-prompt samples")
    evaluate.add_argument("--num-per-digit", type=int, default=100, help="samples per specific prompt")
    evaluate.add_argument("--seed", type=int, default=0)
    for command in (build, evaluate):
        command.add_argument("--threads", type=int, default=2,
                             help="torch CPU threads; on a CPU shared with other jobs 1 is often faster")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "build":
        path = os.path.join(digits_cache_dir(args.cache_dir), BASE_NAME)
        if args.force and os.path.isdir(path):
            shutil.rmtree(path)
        print(ensure_digits_base(args.cache_dir, seed=args.seed))
        return
    report = evaluate_base(args.path, args.num_samples, args.num_per_digit, args.seed)
    generic = report["generic"]
    print(f"generic prompt {GENERIC_PROMPT!r}, {generic['num_samples']} samples, "
          f"{DIGITS_NUM_STEPS} steps, guidance {DIGITS_GUIDANCE_SCALE}")
    print("  class histogram: " + " ".join(f"{d}:{h:.3f}" for d, h in enumerate(generic["histogram"])))
    print(f"  P(even) {generic['p_even']:.3f}   even-class entropy {generic['even_entropy']:.3f} (max 1.609)")
    print(f"  confident share (max-prob >= {CONFIDENCE_THRESHOLD}) {generic['confident_share']:.3f}, real held-out "
          f"{generic['real_confident_share']:.3f}, relative {generic['relative_confident_share']:.3f}")
    print("specific prompts, accuracy per digit: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(report["specific_accuracy"])))
    print(f"  mean {report['specific_accuracy_mean']:.3f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
