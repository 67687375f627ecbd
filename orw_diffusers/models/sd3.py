"""The Stable Diffusion 3 family: SD3-Medium, SD3.5-Medium, SD3.5-Large (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

import torch

from .base import Conditioning
from .pipeline import LoadOptions, PipelineFamily, load_diffusers_pipeline

#: The attention projections of the joint blocks, as diffusers' SD3 DreamBooth LoRA script adapts them.
#: FLUX's joint blocks name theirs alike (the memory planner's default for a FLUX transformer outside ``FluxPipeline``).
JOINT_ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def transformer_velocity(
    model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """``SD3Transformer2DModel``'s call: v(x_sigma, sigma, c). latents: [B, C, H, W]; sigmas: [B].

    Shared by ``SD3Family.predict_velocity`` and the memory planner (which calls it on meta tensors).
    """
    # SD3 takes timestep = sigma * num_train_timesteps (1000), like the pipeline's scheduler.timesteps.
    timestep = sigmas.to(latents.device, torch.float32) * 1000.0
    return model(
        hidden_states=latents,
        timestep=timestep,
        encoder_hidden_states=cond.tensors["prompt_embeds"],
        pooled_projections=cond.tensors["pooled"],
        return_dict=False,
    )[0]


class SD3Family(PipelineFamily):
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    lora_target_modules = list(JOINT_ATTENTION_TARGETS)

    @classmethod
    def load(cls, options: LoadOptions, weight_dtype: torch.dtype, model_index: dict) -> "SD3Family":
        from diffusers import StableDiffusion3Pipeline

        pipe = load_diffusers_pipeline(
            options.pretrained_model_name_or_path,
            StableDiffusion3Pipeline,
            load_t5=options.load_t5,
            model_index=model_index,
            revision=options.revision,
            variant=options.variant,
            dtype=weight_dtype,
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, options)

    def text_encoders(self) -> list[torch.nn.Module]:
        p = self.pipeline
        return [te for te in (p.text_encoder, p.text_encoder_2, p.text_encoder_3) if te is not None]

    def release_text_encoders(self) -> None:
        p = self.pipeline
        p.text_encoder = p.text_encoder_2 = p.text_encoder_3 = None

    def _encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """-> prompt_embeds [B, 77 + max_sequence_length, joint_dim], pooled [B, pooled_dim]."""
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.options.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled": pooled})

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        size = resolution // self.pipeline.vae_scale_factor
        return (self.transformer.config.in_channels, size, size)

    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):  # as StableDiffusion3Pipeline.__call__ does
            patch = self.transformer.config.patch_size
            seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5), c.get("max_shift", 1.16),
            )  # fmt: skip
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.float()

    def predict_velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        return transformer_velocity(model, latents, sigmas, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    #: This family's transformer as the memory planner (``orw_diffusers.memory``) builds and calls it on meta,
    #: by transformer class. Plain data: the planner has configs but no loaded pipeline, so the shapes come from
    #: the configs, mirroring ``latent_shape`` and ``_encode_prompts`` above.
    memory_architectures: dict[str, dict[str, object]] = {
        "SD3Transformer2DModel": {
            # (transformer config, VAE scale factor, resolution) -> per-sample latent shape
            "latent_shape": lambda c, scale, res: (c["in_channels"], res // scale, res // scale),
            # (transformer config, text length) -> per-sample conditioning shapes
            "cond_shapes": lambda c, n: {
                "prompt_embeds": (n, c["joint_attention_dim"]),
                "pooled": (c["pooled_projection_dim"],),
            },
            # (tokenizer max length, max_sequence_length) -> text length: CLIP tokens + T5 tokens
            "text_length": lambda clip_length, t5_length: clip_length + t5_length,
            # v(model, x, sigma, cond, guidance_scale): classifier-free guidance is the sampler's doubled batch
            "velocity": lambda model, latents, sigmas, cond, guidance_scale: transformer_velocity(
                model, latents, sigmas, cond
            ),
            "doubles_batch_for_guidance": True,
            "t5_optional": True,  # load_t5: false zero-fills T5's part of the context
        },
    }
