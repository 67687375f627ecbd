"""Tiny FLUX.1 pipelines (and the T5 parts SD3 can carry too) built in code, for the tests: CLIP (pooled only) +
T5 (sequence) + ``FluxTransformer2DModel`` on packed latents. Nothing here downloads anything."""

from __future__ import annotations

import string
from typing import Iterable

import torch

from orw_diffusers.tiny import WORDS, clip_text_config, clip_tokenizer, vae

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's sentencepiece model


def t5_tokenizer(words: Iterable[str], model_max_length: int = 16):
    """A ``transformers.T5Tokenizer`` (the tokenizers-backed one FLUX loads) over a local Unigram vocabulary.

    Each of ``words`` is one piece ``▁word``; anything else falls back to single characters, so
    every prompt tokenizes without an unknown token. Nothing is downloaded.
    """
    from transformers import T5Tokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    # Unigram scores are log-probabilities: whole words beat their spelling in characters.
    vocab = [(tok, 0.0) for tok in T5_SPECIAL_TOKENS] + [("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted({w.lower() for w in words})]
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_encoder(vocab_size: int, d_model: int = 32, layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A tiny ``T5EncoderModel`` (T5 v1.1 layout: gated-GELU feed-forward, no dropout)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def clip_text_model(vocab_size: int, hidden_size: int = 16, max_positions: int = 16, layers: int = 2, seed: int = 0):
    """A tiny ``CLIPTextModel``: FLUX uses its ``pooler_output`` (no projection), unlike SD3."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(clip_text_config(vocab_size, hidden_size, max_positions, layers)).eval()


def flux_transformer(
    in_channels: int = 16,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 16,
    guidance_embeds: bool = True,
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4),
    seed: int = 0,
):
    """A tiny ``FluxTransformer2DModel``. ``in_channels`` is the packed width: 4 x the VAE's latent channels.

    ``guidance_embeds=True`` is FLUX.1-dev's layout (guidance-distilled), False is schnell's.
    ``axes_dims_rope`` must sum to ``attention_head_dim``.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=None,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def flux_pipeline(
    words: Iterable[str] = WORDS,
    resolution: int = 16,
    vae_blocks: tuple[int, ...] = (8, 16),
    latent_channels: int = 4,
    clip_hidden: int = 16,
    t5_hidden: int = 32,
    model_max_length: int = 16,
    guidance_embeds: bool = True,
    seed: int = 0,
):
    """A complete ``FluxPipeline`` small enough for CPU tests; ``guidance_embeds`` picks dev (True) or schnell.

    Latents are ``latent_channels x resolution/2^(len(vae_blocks)-1)`` squared before packing; the
    side must be even (2x2 packing), so ``resolution`` must be a multiple of ``2^len(vae_blocks)``.
    The scheduler has FLUX.1-dev's config (dynamic shifting) or schnell's (fixed shift 1).
    Save it with ``save_pretrained`` and load it back like any FLUX checkpoint.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip_tok = clip_tokenizer(words, model_max_length)
    t5_tok = t5_tokenizer(words, model_max_length)
    autoencoder = vae(
        latent_channels=latent_channels,
        block_out_channels=vae_blocks,
        norm_num_groups=min(4, vae_blocks[0]),
        sample_size=resolution,
        seed=seed + 4,
    )
    autoencoder.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's VAE constants
    if guidance_embeds:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=autoencoder,
        text_encoder=clip_text_model(len(clip_tok), clip_hidden, model_max_length, seed=seed + 1),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(len(t5_tok), t5_hidden, seed=seed + 2),
        tokenizer_2=t5_tok,
        transformer=flux_transformer(
            in_channels=4 * latent_channels,
            joint_attention_dim=t5_hidden,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=guidance_embeds,
            seed=seed + 3,
        ),
    )
