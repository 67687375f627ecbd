"""Tiny, randomly initialised SD3 components built in code: for the digits demo, benchmarks and tests.

Nothing here downloads anything. The tokenizer is a real ``CLIPTokenizer`` over a small local
vocabulary (characters plus whole-word merges for the words given).
"""

from __future__ import annotations

import string
from typing import Iterable, Optional

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
#: whole-word tokens of the tiny tokenizers (the tests' prompts are made of these)
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "bright", "dark")


def clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level-BPE vocabulary in CLIP's format: every printable character (alone and as a
    word end ``c</w>``) plus left-to-right merges that make each of ``words`` a single token."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens: list[str] = list(SPECIAL_TOKENS) + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(tokens)
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(words: Iterable[str], model_max_length: int = 16):
    """A ``transformers.CLIPTokenizer`` over ``words`` (any other text falls back to characters)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length)


def clip_text_config(vocab_size: int, hidden_size: int, max_positions: int, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def clip_text_encoder(vocab_size: int, hidden_size: int = 16, max_positions: int = 16, layers: int = 2, seed: int = 0):
    """A tiny ``CLIPTextModelWithProjection``: SD3 uses its projected pooled output."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(clip_text_config(vocab_size, hidden_size, max_positions, layers)).eval()


def sd3_transformer(
    sample_size: int = 8,
    in_channels: int = 4,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    patch_size: int = 1,
    qk_norm: Optional[str] = None,
    dual_attention_layers: tuple[int, ...] = (),
    pos_embed_max_size: Optional[int] = None,
    seed: int = 0,
):
    """A tiny ``SD3Transformer2DModel``; ``qk_norm="rms_norm"`` and ``dual_attention_layers=(0,)`` are SD3.5's layout.

    ``pos_embed_max_size`` defaults to ``max(sample_size, 16)``.
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=pos_embed_max_size if pos_embed_max_size is not None else max(sample_size, 16),
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )


def vae(
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (8, 16),
    norm_num_groups: int = 4,
    sample_size: int = 16,
    seed: int = 0,
):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def sd3_pipeline(
    words: Iterable[str] = WORDS,
    resolution: int = 16,
    vae_blocks: tuple[int, ...] = (8, 16),
    text_hidden: int = 16,
    model_max_length: int = 16,
    transformer_layers: int = 2,
    attention_head_dim: int = 8,
    num_attention_heads: int = 2,
    shift: float = 3.0,
    latent_channels: int = 4,
    patch_size: int = 1,
    joint_attention_dim: Optional[int] = None,
    qk_norm: Optional[str] = None,
    dual_attention_layers: tuple[int, ...] = (),
    vae_norm_groups: Optional[int] = None,
    seed: int = 0,
):
    """A complete ``StableDiffusion3Pipeline`` without T5, small enough for CPU tests.

    Latents are ``latent_channels x resolution/2^(len(vae_blocks)-1)`` squared. Save it with
    ``save_pretrained`` and load it back like any SD3 checkpoint (``text_encoder_3=None, tokenizer_3=None``).
    ``joint_attention_dim`` defaults to the two CLIPs' concatenated width ``2 * text_hidden`` (a wider one
    is zero-padded, as the missing T5 context is); ``vae_norm_groups`` to ``min(4, vae_blocks[0])``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = clip_tokenizer(words, model_max_length)
    vocab_size = len(tok)
    te1 = clip_text_encoder(vocab_size, text_hidden, model_max_length, seed=seed + 1)
    te2 = clip_text_encoder(vocab_size, text_hidden, model_max_length, seed=seed + 2)
    latent_size = resolution // 2 ** (len(vae_blocks) - 1)
    transformer = sd3_transformer(
        sample_size=latent_size,
        in_channels=latent_channels,
        num_layers=transformer_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        joint_attention_dim=joint_attention_dim or 2 * text_hidden,
        pooled_projection_dim=2 * text_hidden,
        patch_size=patch_size,
        qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers,
        pos_embed_max_size=max(latent_size // patch_size, 16),
        seed=seed + 3,
    )
    autoencoder = vae(
        latent_channels=latent_channels,
        block_out_channels=vae_blocks,
        norm_num_groups=vae_norm_groups or min(4, vae_blocks[0]),
        sample_size=resolution,
        seed=seed + 4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=autoencoder,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(words, model_max_length),
        text_encoder_3=None,
        tokenizer_3=None,
    )
