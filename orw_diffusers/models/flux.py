"""The FLUX.1 family: FLUX.1-dev and FLUX.1-schnell (``FluxPipeline``), in bf16 or fp32 only.

What differs from SD3, all of it behind ``PipelineFamily``:

- **Packed latents.** The transformer sees the VAE latent ``[C, H, W]`` as 2x2 patches packed into a
  sequence ``[(H/2)*(W/2), 4C]`` (64 wide for FLUX's 16 latent channels). ``latent_shape`` is this packed
  shape, so the trainer's per-sample noise, interpolation and loss work on it unchanged (packing is
  a fixed permutation, so N(0, I) noise stays N(0, I)). Positions go in as ``img_ids`` / ``txt_ids``.
- **Timestep.** The transformer takes ``timestep = sigma`` and multiplies by 1000 itself.
- **Guidance.** FLUX.1-dev is guidance-distilled: the run's ``guidance_scale`` goes into the
  transformer's guidance embedding, in sampling and in training alike, and the sampler does no true
  CFG (as ``FluxPipeline`` with its default ``true_cfg_scale=1``). schnell has no guidance embedding
  and is sampled without guidance.
- **Text.** CLIP's pooled embedding plus T5's sequence; T5 is the only context, so it is required.
- **Precision.** No fp16: see ``FluxFamily.precision_note``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .base import Conditioning
from .pipeline import LoadOptions, PipelineFamily
from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: FluxPipeline refuses longer T5 sequences (``check_inputs``)
MAX_T5_SEQUENCE_LENGTH = 512


def packed_side(seq_len: int) -> int:
    """Tokens per side of a square packed latent of ``seq_len`` tokens."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"packed latents of {seq_len} tokens are not square")
    return side


def transformer_velocity(
    model: torch.nn.Module,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Conditioning,
    guidance: Optional[float],
) -> torch.Tensor:
    """``FluxTransformer2DModel``'s call as ``FluxPipeline`` makes it: v(x_sigma, sigma, c).

    latents: packed [B, seq_len, 4C]; sigmas: [B]; returns v [B, seq_len, 4C]. ``guidance`` feeds the
    guidance embedding of a guidance-distilled model (FLUX.1-dev) and must be None for one without
    (schnell). Shared by ``FluxFamily.predict_velocity`` and the memory planner (which calls it on meta tensors).
    """
    from diffusers import FluxPipeline

    batch, seq_len, _ = latents.shape
    side = packed_side(seq_len)
    device, dtype = latents.device, latents.dtype
    prompt_embeds = cond.tensors["prompt_embeds"]
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side, side, device, dtype)  # [seq_len, 3]
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)  # [T, 3]
    # FLUX takes timestep = sigma. The pipeline passes scheduler.timesteps (sigma * 1000) cast to the
    # latents' dtype, then / 1000; doing the same keeps bf16 rounding identical to FluxPipeline.
    timestep = (sigmas.to(device, torch.float32) * 1000.0).to(dtype) / 1000
    guidance_values = None
    if guidance is not None:
        guidance_values = torch.full((batch,), guidance, device=device, dtype=torch.float32)
    return model(
        hidden_states=latents,
        timestep=timestep,
        guidance=guidance_values,
        pooled_projections=cond.tensors["pooled"],
        encoder_hidden_states=prompt_embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


class FluxFamily(PipelineFamily):
    pipeline_class_names = ("FluxPipeline",)
    # The default of diffusers' FLUX DreamBooth LoRA script (examples/dreambooth/train_dreambooth_lora_flux.py):
    # attention projections of both streams plus the feed-forwards of the double-stream blocks.
    # ("attn.to_q" etc. also match the single-stream blocks' attention.)
    lora_target_modules = [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ]
    supported_dtypes = (torch.float32, torch.bfloat16)
    precision_note = (
        "FLUX's T5-XXL and transformer activations overflow float16 (max 65504) and give NaN or black images; "
        "FLUX is released in bf16: use mixed_precision: bf16"
    )
    required_text_encoders = 2  # CLIP (pooled) and T5 (the sequence)

    def __init__(self, pipeline: Any, options: LoadOptions):
        super().__init__(pipeline, options)
        # The guidance-embedding value, set by ``configure_guidance``; None until then.
        self.embedded_guidance: Optional[float] = None

    @classmethod
    def load(cls, options: LoadOptions, weight_dtype: torch.dtype, model_index: dict) -> "FluxFamily":
        from diffusers import FluxPipeline

        if not options.load_t5:
            raise ConfigError("load_t5: false is not supported by FLUX: T5's sequence is its only text context")
        if options.max_sequence_length > MAX_T5_SEQUENCE_LENGTH:
            raise ConfigError(
                f"max_sequence_length: {options.max_sequence_length} is more than FLUX's {MAX_T5_SEQUENCE_LENGTH}"
            )
        pipe = FluxPipeline.from_pretrained(
            options.pretrained_model_name_or_path,
            revision=options.revision,
            variant=options.variant,
            dtype=weight_dtype,
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, options)

    @property
    def guidance_embeds(self) -> bool:
        """True for a guidance-distilled checkpoint (FLUX.1-dev), False for schnell."""
        return bool(self.transformer.config.guidance_embeds)

    def configure_guidance(self, guidance_scale: float) -> float:
        """dev: ``guidance_scale`` feeds the guidance embedding; schnell: it is ignored. Returns 1 (no true CFG)."""
        if self.guidance_embeds:
            self.embedded_guidance = float(guidance_scale)
        elif guidance_scale != 1.0:
            logger.warning(
                "guidance_scale %s is ignored: this FLUX checkpoint (schnell-like) has no guidance embedding "
                "and is sampled without classifier-free guidance, as FluxPipeline does",
                guidance_scale,
            )
        return 1.0

    def text_encoders(self) -> list[torch.nn.Module]:
        p = self.pipeline
        return [te for te in (p.text_encoder, p.text_encoder_2) if te is not None]

    def release_text_encoders(self) -> None:
        p = self.pipeline
        p.text_encoder = p.text_encoder_2 = None

    def _encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """-> prompt_embeds [B, max_sequence_length, t5_dim] (T5), pooled [B, clip_dim] (CLIP)."""
        # txt_ids (all zeros, [T, 3]) are not batched, so they are rebuilt in predict_velocity, not cached.
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            max_sequence_length=self.options.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled": pooled})

    # --- packed latents -------------------------------------------------------------------------
    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Packed ``(seq_len, 4 * latent_channels)``: ``((resolution / vae_scale_factor / 2)^2, 64)`` for FLUX."""
        patch_px = 2 * self.pipeline.vae_scale_factor  # pixels per packed token side
        if resolution % patch_px:
            raise ConfigError(
                f"resolution: {resolution} must be a multiple of {patch_px} for FLUX (2x2 latent packing)"
            )
        side = resolution // patch_px
        return (side * side, self.transformer.config.in_channels)

    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """As ``FluxPipeline.__call__``: linspace(1, 1/N, N) shifted by ``mu`` of the packed sequence length.

        Returns ``[num_steps + 1]`` float32, ending in 0.
        """
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        # The pipeline always passes mu; the scheduler uses it only with use_dynamic_shifting (dev, not schnell).
        mu = calculate_shift(
            latent_shape[0], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5), c.get("max_shift", 1.15),
        )  # fmt: skip
        if sigmas is None:
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return scheduler.sigmas.float()

    def predict_velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """latents: packed [B, seq_len, 4C]; sigmas: [B]; returns v [B, seq_len, 4C]."""
        guidance = None
        if self.guidance_embeds:
            if self.embedded_guidance is None:
                raise RuntimeError("FluxFamily.configure_guidance(guidance_scale) must be called before any forward")
            guidance = self.embedded_guidance
        return transformer_velocity(model, latents, sigmas, cond, guidance)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, seq_len, 4C] -> images float32 [B, 3, H, W] in [0, 1] (square)."""
        from diffusers import FluxPipeline

        vae = self.vae
        scale = self.pipeline.vae_scale_factor
        pixels = 2 * packed_side(latents.shape[1]) * scale
        latents = FluxPipeline._unpack_latents(latents, pixels, pixels, scale)  # [B, C, H/scale, W/scale]
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    #: This family's transformer as the memory planner (``orw_diffusers.memory``) builds and calls it on meta,
    #: by transformer class. Plain data: the planner has configs but no loaded pipeline, so the shapes come from
    #: the configs, mirroring ``latent_shape`` and ``_encode_prompts`` above.
    memory_architectures: dict[str, dict[str, object]] = {
        "FluxTransformer2DModel": {
            # (transformer config, VAE scale factor, resolution) -> packed latent ((res / scale / 2)^2, 4C)
            "latent_shape": lambda c, scale, res: ((res // scale // 2) ** 2, c["in_channels"]),
            # (transformer config, text length) -> per-sample conditioning shapes
            "cond_shapes": lambda c, n: {
                "prompt_embeds": (n, c["joint_attention_dim"]),
                "pooled": (c["pooled_projection_dim"],),
            },
            # (tokenizer max length, max_sequence_length) -> text length: T5's sequence is the only context
            "text_length": lambda clip_length, t5_length: t5_length,
            # v(model, x, sigma, cond, guidance_scale): dev embeds the guidance scale in every forward
            # (``configure_guidance``); schnell has no guidance embedding
            "velocity": lambda model, latents, sigmas, cond, guidance_scale: transformer_velocity(
                model, latents, sigmas, cond, guidance_scale if model.config.guidance_embeds else None
            ),
            "doubles_batch_for_guidance": False,  # the guidance is embedded, not a doubled batch
            "t5_optional": False,  # ``load`` refuses load_t5: false
        },
    }
