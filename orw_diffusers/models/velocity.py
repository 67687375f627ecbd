"""Plain velocity models behind the model seam: any ``nn.Module`` called like torchcfm's models.

torchcfm's convention: ``model(t, x[, y=labels]) -> v`` with ``t`` in [0, 1], ``t = 0`` noise and
``t = 1`` data, ``v = dx/dt`` pointing towards the data. Ours is diffusers': ``sigma = 1`` noise,
``sigma = 0`` data, ``v = dx/dsigma``. With ``x_t = t x1 + (1 - t) x0`` and ``x_sigma = (1 - sigma) x1
+ sigma x0`` the two paths are the same for ``sigma = 1 - t``, and ``dx/dsigma = -dx/dt``:
``predict_velocity`` is the one place that maps them.

- Pixel space: a sample is the model's input ``[C, H, W]``; ``data_range`` (torchcfm's (-1, 1) by
  default) maps it to the images in [0, 1] that the rewards see (1 channel is repeated to 3).
- Unconditional, or class-conditional when the module has an int ``num_classes`` (torchcfm's
  ``UNetModel`` has it): a prompt is then a class label written as an integer, and ``null_class``
  (if set) is the label of classifier-free guidance's unconditional branch.
- Its LoRA files are one safetensors file with peft's key names, its config in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from ..weight_files import VELOCITY_LORA_NAME
from ..keys import key_field
from .base import Conditioning, FlowModel

logger = logging.getLogger(__name__)

#: the safetensors metadata keys of a velocity model's saved weights: its kind and its module's class
WEIGHTS_KIND_KEY, WEIGHTS_MODULE_KEY = "orw_diffusers_model", "module_class"
VELOCITY_KIND = "velocity"
#: the layer types a LoRA adapter goes on by default (peft supports each)
LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
#: torchcfm's training checkpoints: the keys that hold a model's weights, the preferred first
CHECKPOINT_MODEL_KEYS = ("ema_model", "net_model")


@dataclass
class VelocityKeys:
    """The run-config keys of plain velocity models (``model_factory``; the pipeline's path is then unused)."""

    model_factory: Optional[str] = key_field(
        "'module:function' or 'file.py:function' returning an nn.Module called as model(t, x[, y=labels]) "
        "(torchcfm's convention: t = 0 noise, t = 1 data, the velocity towards the data). Set: train it instead "
        "of a pipeline (pixel space; class-conditional when it has an int num_classes, prompts then being labels).",
        None,
    )
    model_kwargs: Any = key_field("Keyword arguments of model_factory (a mapping).", None)
    model_checkpoint: Optional[str] = key_field(
        "Weights of the model_factory model: a .safetensors state dict, or a torch file read with "
        "weights_only=True: torchcfm's {net_model, ema_model, optim, sched, step} (ema_model when present; the "
        "optimizer and scheduler are never restored) or a bare state dict.",
        None,
        path=True,
    )
    checkpoint_key: Optional[str] = key_field(
        "The entry of model_checkpoint to load, e.g. 'net_model'. Default: 'ema_model' if present, else 'net_model'.",
        None,
    )
    image_shape: Optional[list[int]] = key_field(
        "[C, H, W] of a sample (C 1 or 3). Default: the model's in_channels and image_size (torchcfm's UNet).", None
    )
    data_range: list[float] = key_field(
        "[low, high]: the pixel range of the model's data (torchcfm's [-1, 1]); rewards see images in [0, 1].",
        factory=lambda: [-1.0, 1.0],
    )
    clip_samples: bool = key_field(
        "Plain velocity models: clamp each rollout to data_range before it is scored and trained on, so the model "
        "never learns from samples outside the data's range (at alpha 0 their scale can run away; see "
        "docs/results.md). Off by default, as in the paper's code.",
        False,
    )
    null_class: Optional[int] = key_field(
        "Class-conditional models: the label of classifier-free guidance's unconditional branch "
        "(needed for guidance_scale > 1).",
        None,
    )


def torchcfm_time(sigmas: torch.Tensor) -> torch.Tensor:
    """Our sigmas [B] (1 = noise) -> torchcfm's t [B] (0 = noise)."""
    return 1.0 - sigmas


def sample_shape_of(module: torch.nn.Module) -> Optional[tuple[int, int, int]]:
    """``(in_channels, image_size, image_size)`` when the module exposes both (torchcfm's ``UNetModel``), else None."""
    channels, size = getattr(module, "in_channels", None), getattr(module, "image_size", None)
    if isinstance(channels, int) and isinstance(size, int):
        return channels, size, size
    return None


class VelocityModel(FlowModel):
    """A plain velocity module in torchcfm's convention. ``sample_shape``: ``[C, H, W]`` of one sample
    (default: from the module's ``in_channels`` and ``image_size``)."""

    default_policy = "full"

    def __init__(
        self,
        module: torch.nn.Module,
        sample_shape: Optional[Sequence[int]] = None,
        data_range: Sequence[float] = (-1.0, 1.0),
        null_class: Optional[int] = None,
        clip_samples: bool = False,
    ):
        shape = tuple(int(s) for s in sample_shape) if sample_shape else sample_shape_of(module)
        if shape is None:
            raise ConfigError(
                "image_shape: set it ([C, H, W]): the model exposes no in_channels and image_size to read it from"
            )
        if len(shape) < 1 or any(s <= 0 for s in shape):
            raise ConfigError(f"image_shape: {list(shape)!r} must be positive sizes, e.g. [3, 32, 32]")
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ConfigError(f"image_shape: {list(shape)!r} must be [C, H, W] with 1 or 3 channels (rewards see RGB)")
        low, high = (float(v) for v in data_range)
        if not low < high:
            raise ConfigError(f"data_range: {list(data_range)!r} must be [low, high] with low < high")
        num_classes = getattr(module, "num_classes", None)
        self.num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else None
        if null_class is not None and (self.num_classes is None or not 0 <= null_class < self.num_classes):
            raise ConfigError(
                f"null_class: {null_class!r} needs a class-conditional model with null_class < num_classes "
                f"(num_classes: {self.num_classes})"
            )
        self.module = module
        self.sample_shape: tuple[int, ...] = shape
        self.data_range = (low, high)
        self.null_class = null_class
        self.clip_samples = bool(clip_samples)
        self.lora_target_modules = [n for n, m in module.named_modules() if isinstance(m, LORA_LAYER_TYPES)]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.module

    def configure_guidance(self, guidance_scale: float) -> float:
        if guidance_scale <= 1:
            return guidance_scale
        if self.null_class is None:
            if self.num_classes is not None:
                raise ConfigError(
                    f"guidance_scale: {guidance_scale:g} needs null_class (the label of the unconditional branch) "
                    f"on this class-conditional model; or set guidance_scale: 1"
                )
            logger.info("unconditional velocity model: no classifier-free guidance (guidance_scale %g unused)",
                        guidance_scale)  # fmt: skip
            return 1.0
        return guidance_scale

    def prepare(self, prompts: Sequence[str], negative_prompt: str, device: torch.device) -> None:
        self.module.to(device)
        self.class_labels(prompts)  # a bad label fails here, before any round
        self.check_output_shape(device)

    @torch.no_grad()
    def check_output_shape(self, device: torch.device) -> None:
        """One forward on two zero samples: the velocity must have the sample's shape."""
        x = torch.zeros((2, *self.sample_shape), device=device)
        cond = None if self.num_classes is None else Conditioning({"y": torch.zeros(2, dtype=torch.long, device=device)})
        was_training = self.module.training
        self.module.eval()
        try:
            out = self.module(torchcfm_time(torch.full((2,), 0.5, device=device)), x, **self._kwargs(cond))
        except Exception as e:  # noqa: BLE001 - any failure of the user's module, reported in one line
            raise ConfigError(f"model: calling it as model(t, x{', y=labels' if cond else ''}) failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip
        finally:
            self.module.train(was_training)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"model: its output {got} differs from its input {tuple(x.shape)}; "
                              f"a velocity model returns a tensor shaped like x")  # fmt: skip

    def class_labels(self, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        """Prompts -> class labels [len(prompts)] long (None for an unconditional model, whose prompts are unused)."""
        if self.num_classes is None:
            return None
        labels = []
        for prompt in prompts:
            try:
                label = int(str(prompt).strip())
            except ValueError:
                label = -1
            if not 0 <= label < self.num_classes:
                raise ConfigError(f"prompts: {prompt!r} is not a class label of this model (an integer in "
                                  f"0..{self.num_classes - 1})")  # fmt: skip
            labels.append(label)
        return torch.tensor(labels, dtype=torch.long)

    def conditioning(self, prompts: Sequence[str], device: torch.device) -> Optional[Conditioning]:
        labels = self.class_labels(prompts)
        return None if labels is None else Conditioning({"y": labels.to(device)})

    def negative_conditioning(self, n: int, device: torch.device) -> Optional[Conditioning]:
        if self.null_class is None:
            return None
        return Conditioning({"y": torch.full((n,), self.null_class, dtype=torch.long, device=device)})

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        return self.sample_shape  # pixel space: the model's own size, whatever ``resolution`` says

    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1)  # uniform in t, as torchcfm's fixed-step solvers

    @staticmethod
    def _kwargs(cond: Optional[Conditioning]) -> dict[str, torch.Tensor]:
        return {} if cond is None else {"y": cond.tensors["y"]}

    def predict_velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, cond: Optional[Conditioning]
    ) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        t = torchcfm_time(sigmas).to(latents.device, dtype)
        v_torchcfm = model(t, latents.to(dtype), **self._kwargs(cond))  # dx/dt, towards the data
        return (-v_torchcfm).to(latents.dtype)  # dx/dsigma = -dx/dt

    def finish_rollout(self, latents: torch.Tensor) -> torch.Tensor:
        """``clip_samples``: clamp to ``data_range``, so what is trained on is the image the reward scored."""
        return latents.clamp(*self.data_range) if self.clip_samples else latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        low, high = self.data_range
        images = ((latents.float() - low) / (high - low)).clamp(0, 1)
        return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.module, "enable_gradient_checkpointing"):
            raise ConfigError(
                "gradient_checkpointing: this velocity model has no enable_gradient_checkpointing() "
                "(torchcfm's UNet takes use_checkpoint=True when it is built)"
            )
        self.module.enable_gradient_checkpointing()

    # --- LoRA files: one safetensors file, peft's key names, the LoRA config in its metadata ------------
    def save_lora_weights(self, save_directory: str, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = json.dumps(metadata, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
        save_file(state_dict, os.path.join(save_directory, VELOCITY_LORA_NAME),
                  metadata={"lora_config": config, **self.weights_metadata()})  # fmt: skip

    def read_lora_weights(self, directory: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(os.path.join(directory, VELOCITY_LORA_NAME))

    def lora_usage(self, directory: str) -> str:
        path = os.path.join(directory, VELOCITY_LORA_NAME)
        return f"LoRA adapter: {path} (orw_diffusers.models.velocity.load_lora_adapter(module, {path!r}))"

    def weights_metadata(self) -> dict[str, str]:
        cls = type(self.module)
        return {WEIGHTS_KIND_KEY: VELOCITY_KIND, WEIGHTS_MODULE_KEY: f"{cls.__module__}.{cls.__qualname__}"}


def load_lora_adapter(module: torch.nn.Module, path: str, merge: bool = True) -> torch.nn.Module:
    """Put the adapter of a velocity run's ``lora_adapter.safetensors`` on ``module`` (its base model).

    ``merge=True`` folds it into the weights and returns the plain module; else the peft layers stay.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["lora_config"])
    known = set(LoraConfig.__dataclass_fields__)
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type")})
    inject_adapter_in_model(lora_config, module)
    set_peft_model_state_dict(module, load_file(path))
    if not merge:
        return module
    from .. import lora

    merged = lora.merged_state_dict(module, "default")
    for name, layer in list(module.named_modules()):
        for child_name, child in list(layer.named_children()):
            if hasattr(child, "get_base_layer") and hasattr(child, "lora_A"):
                setattr(layer, child_name, child.get_base_layer())
    del module.peft_config
    module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in merged.items()})
    return module


# --- building one from a run config ---------------------------------------------------------------
def read_velocity_checkpoint(path: str, key: Optional[str] = None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a checkpoint file -> (state dict, which entry was taken).

    - ``.safetensors``: a state dict.
    - otherwise ``torch.load(weights_only=True)``: torchcfm's training checkpoint ``{'net_model',
      'ema_model', 'optim', 'sched', 'step'}`` (``key``, else ``ema_model`` when present, else
      ``net_model``; the optimizer and scheduler are never read), a checkpoint of ``ORWCFMTrainer``
      (``net_model``), or a bare state dict.

    A ``module.`` prefix on every key (a model saved through DDP) is dropped.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"model_checkpoint: {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state, which = load_file(path), "the safetensors state dict"
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles that weights_only refuses, corrupt files
            raise ConfigError(f"model_checkpoint: {path!r} cannot be read with torch.load(weights_only=True) "
                              f"({type(e).__name__})") from None  # fmt: skip
        if not isinstance(loaded, dict):
            raise ConfigError(f"model_checkpoint: {path!r} holds a {type(loaded).__name__}, not a state dict")
        present = [k for k in CHECKPOINT_MODEL_KEYS if k in loaded]
        if key is not None:
            if key not in loaded:
                raise ConfigError(f"checkpoint_key: {key!r} is not in {path!r} (keys: {', '.join(map(str, loaded))})")
            state, which = loaded[key], repr(key)
        elif present:
            state, which = loaded[present[0]], repr(present[0])
        else:
            state, which = loaded, "the bare state dict"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model_checkpoint: entry {which} of {path!r} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, which


def load_velocity_weights(module: torch.nn.Module, path: str, key: Optional[str] = None) -> str:
    """Load a checkpoint's weights into ``module`` (strict); returns the log line saying which entry was used."""
    state, which = read_velocity_checkpoint(path, key)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        kind = "missing" if result.missing_keys else "unexpected"
        raise ConfigError(f"model_checkpoint: {which} of {path!r} does not fit the model ({kind} key {bad!r})")
    return f"loaded {which} of {path}"


def build_velocity_model(cfg: Any) -> VelocityModel:
    """The velocity model of a run config: ``model_factory(**model_kwargs)``, weights from ``model_checkpoint``."""
    from ..user_code import resolve_callable

    factory = resolve_callable(cfg.model_factory, "model_factory")
    module = factory(**(cfg.model_kwargs or {}))
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model_factory: {cfg.model_factory!r} returned a {type(module).__name__}, not an nn.Module")
    if cfg.model_checkpoint:
        logger.info("%s; no optimizer or scheduler state is restored", load_velocity_weights(
            module, cfg.model_checkpoint, cfg.checkpoint_key))  # fmt: skip
    return VelocityModel(module, cfg.image_shape, cfg.data_range, cfg.null_class, cfg.clip_samples)


def validate_velocity_config(cfg: Any, model_given: bool = False) -> None:
    """The checks of the plain-velocity keys that need no model (the model's own are made when it is built).

    ``model_given``: the velocity module comes as an object (``orw_diffusers.cfm``), not from ``model_factory``.
    """
    factory_keys = ("model_kwargs", "model_checkpoint", "checkpoint_key")
    if cfg.model_factory is None:
        velocity_keys = factory_keys if model_given else (*factory_keys, "image_shape", "null_class")
        for key in velocity_keys:
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key}: only used with model_factory (a plain velocity model)")
        if cfg.clip_samples and not model_given:
            raise ConfigError("clip_samples: only used with model_factory (a pipeline's latents have no range)")
        if not model_given:
            return
    elif ":" not in cfg.model_factory:
        raise ConfigError(f"model_factory: {cfg.model_factory!r} is not 'module:function' or 'file.py:function'")
    if cfg.model_kwargs is not None and not isinstance(cfg.model_kwargs, dict):
        raise ConfigError(f"model_kwargs: {cfg.model_kwargs!r} must be a mapping of keyword arguments")
    if cfg.model_checkpoint is not None and not os.path.isfile(cfg.model_checkpoint):
        raise ConfigError(f"model_checkpoint: {cfg.model_checkpoint!r} does not exist")
    if cfg.checkpoint_key is not None and not cfg.model_checkpoint:
        raise ConfigError("checkpoint_key: only used with model_checkpoint")
    if cfg.image_shape is not None and (len(cfg.image_shape) != 3 or cfg.image_shape[0] not in (1, 3)
                                        or min(cfg.image_shape) <= 0):  # fmt: skip
        raise ConfigError(f"image_shape: {cfg.image_shape!r} must be [C, H, W] with 1 or 3 channels")
    if len(cfg.data_range) != 2 or not cfg.data_range[0] < cfg.data_range[1]:
        raise ConfigError(f"data_range: {cfg.data_range!r} must be [low, high] with low < high")
    if cfg.push_to_hub:
        raise ConfigError("push_to_hub: uploads a pipeline's LoRA; a plain velocity model's weights stay in output_dir")
