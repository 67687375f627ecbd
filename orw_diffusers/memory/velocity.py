"""The plan of a plain velocity model (``model_factory``): its module built on meta by its own factory, called
through ``VelocityModel.predict_velocity`` as the trainer calls it; no VAE and no text encoders (a sample is the
model's input, decoded by a linear map to [0, 1])."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from ..models.base import Conditioning
from ..models.velocity import VelocityModel
from .plan import PlanSettings
from .planner import Architecture, MemoryPlanner
from .trace import trace_peak


class VelocityPlanner(MemoryPlanner):
    """``MemoryPlanner`` for a velocity model: ``build`` makes the module (on the current device: meta here).
    Its weights are fp32 whatever ``mixed_precision`` (the trainer keeps a velocity model's own weights)."""

    denoiser_name = "velocity model"
    decode_name = "decode"

    def __init__(self, build: Callable[[], torch.nn.Module], model: VelocityModel):
        self.build, self.velocity_model = build, model
        self.arch = Architecture(
            family=type(model),  # type: ignore[arg-type] - its supported_dtypes is what the advice reads
            latent_shape=lambda config, scale, resolution: model.sample_shape,
            cond_shapes=lambda config, length: {},
            text_length=lambda tokenizer_length, max_length: 0,
            velocity=lambda net, x, sigmas, cond, g: model.predict_velocity(net, x, sigmas, cond),
            doubles_batch_for_guidance=model.null_class is not None,
            t5_optional=False,
        )
        self._models, self._traces, self._attached = {}, {}, {}
        self.default_lora_targets, self.default_policy = list(model.lora_target_modules), model.default_policy
        self.can_checkpoint = False

    @classmethod
    def from_config(cls, cfg: Any) -> "VelocityPlanner":
        """The run config's ``model_factory(**model_kwargs)``, built on meta (``model_checkpoint`` is not read)."""
        from ..user_code import resolve_callable

        factory = resolve_callable(cfg.model_factory, "model_factory")

        def build() -> torch.nn.Module:
            with torch.device("meta"):
                module = factory(**(cfg.model_kwargs or {}))
            if not isinstance(module, torch.nn.Module):
                raise ConfigError(f"model_factory: {cfg.model_factory!r} returned a {type(module).__name__}, "
                                  f"not an nn.Module")  # fmt: skip
            return module.float()

        return cls(build, VelocityModel(build(), cfg.image_shape, cfg.data_range, cfg.null_class, cfg.clip_samples))

    def _build_denoiser(self, s: PlanSettings) -> torch.nn.Module:
        return self.build()

    def vae(self, s: PlanSettings) -> Optional[torch.nn.Module]:
        return None

    def text_encoders(self, s: PlanSettings) -> dict[str, torch.nn.Module]:
        return {}

    def latent_shape(self, s: PlanSettings) -> tuple[int, ...]:
        return self.velocity_model.sample_shape

    def image_pixels(self, s: PlanSettings) -> int:
        return self.velocity_model.sample_shape[-2] * self.velocity_model.sample_shape[-1]

    def _cond(self, s: PlanSettings, batch: int) -> dict[str, torch.Tensor]:
        if self.velocity_model.num_classes is None:
            return {}
        return {"y": torch.zeros(batch, dtype=torch.long, device="meta")}  # class labels

    def _velocity(
        self, s: PlanSettings, model: torch.nn.Module, x: torch.Tensor, sigmas: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        return self.arch.velocity(model, x, sigmas, Conditioning(cond) if cond else None, s.guidance_scale)

    def train_step_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        if s.gradient_checkpointing:
            raise ConfigError("gradient_checkpointing: the memory planner does not plan this model's own "
                              "checkpointing; plan without it")  # fmt: skip
        return super().train_step_peak(s, batch)

    def decode_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """``VelocityModel.decode``: the samples mapped to images in [0, 1] (float32, RGB)."""

        def trace_at(b: int) -> int:
            latents = torch.randn(b, *self.latent_shape(s), dtype=s.weight_dtype, device="meta")
            return trace_peak(lambda: self.velocity_model.decode(latents), s.autocast_dtype)

        return self._linear(("decode", s.weight_dtype), batch or s.sample_batch_size, trace_at)

    def encode_peak(self, s: PlanSettings) -> int:
        return 0
