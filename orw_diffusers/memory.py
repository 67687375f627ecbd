"""GPU memory planner: does a run config fit on a GPU, and which knob to turn first if not.

    python -m orw_diffusers.memory --config run.yaml [--gpu_memory 24GiB] [--key value ...]

Nothing is downloaded. The model's real architecture is built from its configs on the ``meta``
device (shapes only: no weights, no compute), with the two LoRA adapters attached by the trainer's
own ``lora.add_adapters``. The activation memory of each phase of a round is then *measured*, not
guessed: the phase's real forward (and backward) passes run on meta tensors while ``trace_peak``
counts the bytes of every tensor alive after each operator. Two details make this match a GPU:

- attention runs through the fused (flash) kernel's signature, which keeps only the output and the
  log-sum-exp for backward, as PyTorch's SDPA does on CUDA and on CPU (meta would otherwise take
  the math path and count the full attention matrix);
- with ``mixed_precision`` fp16/bf16 the trainer runs under CUDA autocast; ``_AutocastEmulation``
  casts the inputs of the same operator lists (matmuls to half, norms and reductions to fp32).

Configs: a local diffusers directory is read as it is (``model_index.json`` and each component's
``config.json``); the hub ids in ``SHIPPED_MODELS`` map to the public configs shipped in
``orw_diffusers/model_configs/``. ``docs/memory.md`` describes the phases, the assumptions and how
the activation model was validated against measured memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .config import TrainConfig
from .errors import ConfigError
from .models import family_for, flux, sd3
from .models.base import Conditioning

GiB = 1024**3
PHASES = ("encode", "sample", "decode", "reward", "train")
PHASE_HELP = {
    "encode": "fill the prompt cache (text encoders on the GPU, nothing else yet)",
    "sample": "one Euler step of the sampling batch (no grad; x2 batch with classifier-free guidance)",
    "decode": "VAE decode of the sampling batch",
    "reward": "reward model on the decoded images",
    "train": "one training micro-batch: reference forward (no grad) + policy forward + backward",
}
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REWARD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
# Hub id -> shipped file of public configs (model_index.json + every component's config.json).
SHIPPED_MODELS: dict[str, str] = {
    "stabilityai/stable-diffusion-3.5-medium": "stable-diffusion-3.5-medium.json",
    "stabilityai/stable-diffusion-3.5-large": "stable-diffusion-3.5-large.json",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev.json",
}
# CUDA context, cuBLAS workspaces and caching-allocator slack: an assumption, not a measurement
# (this planner was validated on CPU); override with --runtime_overhead.
DEFAULT_RUNTIME_OVERHEAD = "0.75GiB"
PROMPT_CACHE_BATCH = 8  # PromptCache encodes this many prompts per text-encoder call


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'24GiB', '24GB' (10^9), '23028MiB', '1.5 GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: expected a number and a unit such as 24GiB, 24GB or 23028MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


# ------------------------------------------------------------------------------------------------
# Model configs: shipped public configs or a local diffusers directory
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfigs:
    """The configs of one diffusers pipeline: ``model_index.json`` and ``{component: config}``."""

    source: str  # the hub id of a shipped config, or a local directory
    model_index: dict
    components: dict[str, dict]

    @property
    def pipeline_class(self) -> str:
        return self.model_index.get("_class_name", "<missing _class_name>")

    @property
    def transformer_class(self) -> str:
        return self.components["transformer"].get("_class_name") or self.model_index["transformer"][1]

    def text_encoders(self) -> dict[str, dict]:
        """``text_encoder*`` components the pipeline has (a null model_index entry means none)."""
        out = {}
        for name in sorted(self.components):
            entry = self.model_index.get(name)
            if name.startswith("text_encoder") and isinstance(entry, list) and entry[0] is not None:
                out[name] = self.components[name]
        return out

    def tokenizer_max_length(self) -> int:
        return int(self.components.get("tokenizer", {}).get("model_max_length", 77))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load_model_configs(name_or_path: str) -> ModelConfigs:
    """A local diffusers directory, or one of ``SHIPPED_MODELS``; anything else is a one-line error."""
    if os.path.isdir(name_or_path):
        index_file = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(index_file):
            raise ConfigError(
                f"model {name_or_path!r}: the directory has no model_index.json (not a diffusers pipeline)"
            )
        index = _read_json(index_file)
        components = {}
        for name, entry in index.items():
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
                continue
            for file in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
                path = os.path.join(name_or_path, name, file)
                if os.path.isfile(path):
                    components[name] = _read_json(path)
                    break
        for required in ("transformer", "vae"):
            if required not in components:
                raise ConfigError(f"model {name_or_path!r}: {required}/config.json is missing")
        return ModelConfigs(os.path.abspath(name_or_path), index, components)
    if name_or_path in SHIPPED_MODELS:
        data = _read_json(os.path.join(MODEL_CONFIG_DIR, SHIPPED_MODELS[name_or_path]))
        return ModelConfigs(name_or_path, data["model_index"], data["components"])
    known = ", ".join(SHIPPED_MODELS)
    raise ConfigError(
        f"model {name_or_path!r}: not a local diffusers directory and no shipped config (known: {known}); "
        f"download its model_index.json and */config.json into a directory and pass that path"
    )


# ------------------------------------------------------------------------------------------------
# Tracing peak memory on the meta device
# ------------------------------------------------------------------------------------------------

# (operator, metadata of its arguments) -> shapes of its fresh outputs, or None when they alias an
# input or are not all tensors. A meta kernel is a pure function of that metadata, and most of a
# model's operators repeat layer after layer, so reusing the result makes a trace ~4x faster.
_OUTPUT_SPECS: dict[Any, Optional[tuple[bool, list[tuple]]]] = {}


def _key(value: Any) -> Any:
    """Hashable metadata of an operator argument (tensors by shape, strides, dtype and offset)."""
    kind = type(value)
    if kind is tuple or kind is list:
        return (kind is list, *map(_key, value))
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype, value.storage_offset(), value.device.type)
    if kind is dict:
        return ("D", *((k, _key(v)) for k, v in sorted(value.items())))
    return value


def _tensors(value: Any, out: list) -> list:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)
    return out


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created under it for as long as the storage lives.

    Runs below autograd, so it sees the forward ops, the tensors autograd saves for backward (kept
    alive by the graph) and every gradient the backward creates. Storages that existed before
    (weights, buffers) are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def _track(self, t: torch.Tensor, inputs: set) -> bool:
        """Count ``t``'s storage if it is new; False if it aliases an input or a counted storage."""
        storage = t.untyped_storage()
        sid = id(storage)
        if sid in inputs or sid in self.live:
            return False
        self.live[sid] = storage.nbytes()
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, sid)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = None
        if not func._schema.is_mutable:
            try:
                key = (func, _key(args), _key(kwargs))
                spec = _OUTPUT_SPECS.get(key, False)
            except TypeError:  # an unhashable argument
                key, spec = None, False
            if spec:  # fresh outputs of known shapes: make them instead of running the meta kernel
                single, shapes = spec
                made = [torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in shapes]
                for t in made:
                    self._track(t, set())
                self.peak = max(self.peak, self.current)
                return made[0] if single else tuple(made)
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs), [])}
        outputs = _tensors(out, [])
        fresh = isinstance(out, (torch.Tensor, tuple)) and len(outputs) == (
            1 if isinstance(out, torch.Tensor) else len(out)
        )
        for t in outputs:
            fresh = self._track(t, inputs) and fresh
        if key is not None and key not in _OUTPUT_SPECS:
            ok = fresh and all(t.device.type == "meta" and t.storage_offset() == 0 for t in outputs)
            _OUTPUT_SPECS[key] = (
                (isinstance(out, torch.Tensor), [(tuple(t.shape), t.stride(), t.dtype) for t in outputs])
                if ok
                else None
            )
        self.peak = max(self.peak, self.current)
        return out


_AUTOCAST_DTYPE: list[torch.dtype] = []  # innermost _AutocastEmulation's dtype, read by _flash_sdpa


def _flash_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    _math: Callable = F.scaled_dot_product_attention,
) -> torch.Tensor:
    """SDPA as the fused kernel stores it (output + log-sum-exp), the kernel a GPU and the CPU pick
    when there is no mask. With a mask (T5's position bias) the math path runs, as on a GPU."""
    if attn_mask is not None or enable_gqa:
        return _math(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    dtype = _AUTOCAST_DTYPE[-1] if _AUTOCAST_DTYPE else query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    # Attention code looks ``F.scaled_dot_product_attention`` up at call time, so swapping the
    # attribute also covers the recomputation of gradient checkpointing during backward.
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# CUDA autocast's operator lists (torch/csrc/autograd/autocast_mode), as torch functions.
_LOW_PRECISION_FUNCS = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.addmm,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
}
_FP32_FUNCS = {
    F.layer_norm,
    F.group_norm,
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    F.log_softmax,
    torch.exp,
    torch.Tensor.exp,
    torch.pow,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.sum,
    torch.Tensor.sum,
    F.mse_loss,
    torch.log,
    torch.Tensor.log,
    torch.cumsum,
    torch.norm,
    torch.Tensor.norm,
}


class _AutocastEmulation(TorchFunctionMode):
    """CUDA autocast on meta tensors (meta has no autocast of its own): matmuls and convolutions
    get half-precision inputs, norms, softmax and reductions fp32 inputs. Casts happen above
    autograd, as autocast's do, so autograd saves the same tensors."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __enter__(self):
        _AUTOCAST_DTYPE.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        _AUTOCAST_DTYPE.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION_FUNCS:
            target = self.dtype
        elif func in _FP32_FUNCS:
            target = torch.float32
        else:
            return func(*args, **kwargs)

        def cast(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != target:
                return x.to(target)
            return x

        return func(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})


def checkpoint_under_autocast(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' gradient-checkpointing function, with the autocast emulation of the forward
    re-entered when backward recomputes the block (real autocast state is restored the same way)."""
    dtype = _AUTOCAST_DTYPE[-1] if _AUTOCAST_DTYPE else None

    def run(*inner: Any) -> Any:
        if dtype is None:
            return module(*inner)
        with _AutocastEmulation(dtype):
            return module(*inner)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def trace_peak(fn: Callable[[], Any], autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Peak bytes of the tensors created while ``fn()`` runs on meta tensors (excluding tensors
    that existed before, such as weights). ``autocast_dtype``: emulate CUDA autocast to it."""
    counter = _LiveBytes()
    emulation = _AutocastEmulation(autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with _fused_attention(), emulation, counter:
        result = fn()
    del result
    return counter.peak


# ------------------------------------------------------------------------------------------------
# Building the architecture on meta
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    # ``ModelMixin.to(dtype)`` warns about fp32-kept modules, which is irrelevant without weights
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def meta_diffusers_model(config: dict, dtype: torch.dtype, class_name: Optional[str] = None) -> torch.nn.Module:
    """A diffusers model (transformer, VAE) from its config, on meta, in ``dtype``."""
    import diffusers
    from accelerate import init_empty_weights

    name = class_name or config["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ConfigError(f"model config: diffusers has no model class {name!r}")
    with _quiet_diffusers(), init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    with _quiet_diffusers():
        return model.to(dtype)


def meta_text_encoder(config: dict, dtype: torch.dtype, class_name: Optional[str] = None) -> torch.nn.Module:
    """A transformers text encoder from its config.json, on meta, in ``dtype``."""
    import transformers
    from accelerate import init_empty_weights

    name = class_name or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise ConfigError(f"text encoder config: transformers has no model class {name!r}")
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=True):
        model = cls(cls.config_class.from_dict(values))
    return model.to(dtype).eval()


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers (both move to the GPU with the module)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ------------------------------------------------------------------------------------------------
# What each transformer architecture takes (the planner's counterpart of models/<family>.py)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How to call one transformer class with meta inputs shaped like the trainer's."""

    #: per-sample shape of the model's latent input, from (transformer config, VAE scale, resolution)
    latent_shape: Callable[[dict, int, int], tuple[int, ...]]
    #: per-sample conditioning shapes, from (transformer config, text length)
    cond_shapes: Callable[[dict, int], dict[str, tuple[int, ...]]]
    #: text length of the conditioning, from (tokenizer max length, max_sequence_length)
    text_length: Callable[[int, int], int]
    #: v(x, sigma, cond, guidance_scale) as the family calls the model (models/<family>.py's ``transformer_velocity``)
    velocity: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float], torch.Tensor]
    #: whether classifier-free guidance doubles the sampling batch (FLUX.1-dev embeds guidance instead)
    doubles_batch_for_guidance: bool
    #: whether T5 can be dropped (``load_t5: false``) and the context zero-filled
    t5_optional: bool
    #: LoRA targets when no registered family loads this pipeline (else the family's are used)
    default_lora_targets: tuple[str, ...]


def _sd3_velocity(model, latents, sigmas, cond, guidance_scale):
    # classifier-free guidance is the sampler's (a doubled batch), not the model's
    return sd3.transformer_velocity(model, latents, sigmas, Conditioning(cond))


def _flux_velocity(model, latents, sigmas, cond, guidance_scale):
    # FLUX.1-dev embeds the guidance scale in every forward (FluxFamily.configure_guidance); schnell has no embedding
    guidance = guidance_scale if model.config.guidance_embeds else None
    return flux.transformer_velocity(model, latents, sigmas, Conditioning(cond), guidance)


ARCHITECTURES: dict[str, Architecture] = {
    "SD3Transformer2DModel": Architecture(
        latent_shape=lambda c, scale, res: (c["in_channels"], res // scale, res // scale),
        cond_shapes=lambda c, n: {
            "prompt_embeds": (n, c["joint_attention_dim"]),
            "pooled": (c["pooled_projection_dim"],),
        },
        text_length=lambda tokenizer_length, t5_length: tokenizer_length + t5_length,  # CLIP tokens + T5 tokens
        velocity=_sd3_velocity,
        doubles_batch_for_guidance=True,
        t5_optional=True,
        default_lora_targets=sd3.JOINT_ATTENTION_TARGETS,
    ),
    "FluxTransformer2DModel": Architecture(
        latent_shape=lambda c, scale, res: ((res // scale // 2) ** 2, c["in_channels"]),
        cond_shapes=lambda c, n: {
            "prompt_embeds": (n, c["joint_attention_dim"]),
            "pooled": (c["pooled_projection_dim"],),
        },
        text_length=lambda tokenizer_length, t5_length: t5_length,
        velocity=_flux_velocity,
        doubles_batch_for_guidance=False,
        t5_optional=False,
        default_lora_targets=sd3.JOINT_ATTENTION_TARGETS,
    ),
}


def architecture(configs: ModelConfigs) -> Architecture:
    name = configs.transformer_class
    if name not in ARCHITECTURES:
        raise ConfigError(f"model {configs.source!r}: transformer {name!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# ------------------------------------------------------------------------------------------------
# Reward models (loaded by the reward factories, so counted from their public checkpoints)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModel:
    """A reward's model on the GPU. Activations: peak no-grad bytes per 224 px image in fp16,
    measured once with ``trace_peak`` on the open_clip architecture."""

    key: str  # rewards sharing a key share one loaded model (see rewards.common.load_once)
    description: str
    parameters: int
    activation_bytes_per_image: int


_VIT_H = RewardModel("open_clip:ViT-H-14:laion2b_s32b_b79k", "open_clip ViT-H-14", 986_109_441, 8 * 2**20)
REWARD_MODELS: dict[str, Optional[RewardModel]] = {
    "clip_score": _VIT_H,
    "clip_zero_shot": _VIT_H,
    "hpsv2": replace(_VIT_H, key="open_clip:ViT-H-14:hpsv2", description="open_clip ViT-H-14 (HPSv2 weights)"),
    "aesthetic": RewardModel("open_clip:ViT-L-14", "open_clip ViT-L-14 + aesthetic MLP", 428_544_482, 9 * 2**20),
    "pickscore": RewardModel("hf:pickscore", "CLIP ViT-H-14 (PickScore)", 986_109_441, 8 * 2**20),
    "digit_even": RewardModel("digits", "digit CNN", 30_000, 2**20),
    "digit_in": RewardModel("digits", "digit CNN", 30_000, 2**20),
    "jpeg_compressibility": None,  # PIL on the CPU
    "jpeg_incompressibility": None,
    "remote_http": None,  # another machine
}


# ------------------------------------------------------------------------------------------------
# Settings, items, plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """The run-config values that decide GPU memory (see ``from_train_config``)."""

    model: str
    resolution: int = 512
    train_batch_size: int = 2
    sample_batch_size: int = 4
    samples_per_process: int = 16
    rank: int = 32
    lora_alpha: Optional[float] = None
    lora_target_modules: Optional[tuple[str, ...]] = None
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    prompt_cache: bool = True
    load_t5: bool = True
    max_sequence_length: int = 256
    guidance_scale: float = 4.5
    reference_pass: bool = True
    rewards: tuple[str, ...] = ("clip_score",)
    reward_on_gpu: bool = True
    reward_dtype: str = "float32"
    reward_batch_size: int = 32
    num_processes: int = 1

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, num_processes: int = 1, prompt_cache: bool = True) -> "PlanSettings":
        from .config import derive_sizes
        from .rewards import parse_reward_spec

        if cfg.prompts_per_round:
            num_prompts = cfg.prompts_per_round
        else:
            from .prompts import load_prompts

            num_prompts = len(load_prompts(cfg))
        sizes = derive_sizes(cfg, num_prompts, num_processes)
        return cls(
            model=cfg.pretrained_model_name_or_path,
            resolution=cfg.resolution,
            train_batch_size=cfg.train_batch_size,
            sample_batch_size=cfg.sample_batch_size,
            samples_per_process=sizes.samples_per_process,
            rank=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_target_modules=tuple(cfg.lora_target_modules) if cfg.lora_target_modules else None,
            mixed_precision=cfg.mixed_precision,
            gradient_checkpointing=cfg.gradient_checkpointing,
            prompt_cache=prompt_cache,
            load_t5=cfg.load_t5,
            max_sequence_length=cfg.max_sequence_length,
            guidance_scale=cfg.guidance_scale,
            reference_pass=cfg.w2_coefficient > 0 or cfg.log_w2_distance,
            rewards=tuple(spec.name for spec in parse_reward_spec(cfg.reward)),
            reward_on_gpu=not (cfg.reward_device or "").startswith("cpu"),
            reward_dtype=cfg.reward_dtype,
            reward_batch_size=cfg.reward_batch_size,
            num_processes=num_processes,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.mixed_precision]

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return None if self.mixed_precision == "no" else self.weight_dtype


@dataclass(frozen=True)
class MemoryItem:
    """One component of GPU memory and the phases of a round during which it is resident."""

    group: str  # "frozen weights", "LoRA", "activations", "round data", "runtime"
    name: str
    bytes: int
    phases: tuple[str, ...]


@dataclass
class MemoryPlan:
    settings: PlanSettings
    items: list[MemoryItem]
    notes: list[str] = field(default_factory=list)

    def phase_total(self, phase: str) -> int:
        return sum(item.bytes for item in self.items if phase in item.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    def peak_items(self) -> list[MemoryItem]:
        """The items resident in the peak phase; their bytes add up to ``peak``."""
        return [item for item in self.items if self.peak_phase in item.phases]

    def item(self, name: str) -> MemoryItem:
        return next(i for i in self.items if i.name == name)

    def fits(self, budget: int) -> bool:
        return self.peak <= budget


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------


class MemoryPlanner:
    """Builds each model of one pipeline on meta once and caches the traced activations, so that
    ``plan`` can be called again and again (the knob search does) at little cost.

    Activations are linear in the batch size (every operator is batch-parallel; only the
    autocast copies of the weights are not), so each phase is traced at batch 1 and 2 and
    extrapolated; ``trace_peak`` at any other batch gives the same number.
    """

    def __init__(self, configs: ModelConfigs):
        self.configs = configs
        self.arch = architecture(configs)
        vae_cfg = configs.components["vae"]
        self.vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        self._models: dict[Any, torch.nn.Module] = {}
        self._traces: dict[Any, int] = {}
        # the LoRA targets the trainer would use: its family's defaults where the family exists
        try:
            self.default_lora_targets = list(family_for(configs.pipeline_class).lora_target_modules)
        except ConfigError:
            self.default_lora_targets = list(self.arch.default_lora_targets)

    # --- meta models --------------------------------------------------------------------------
    def _cached(self, key: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def lora_targets(self, s: PlanSettings) -> list[str]:
        return list(s.lora_target_modules or self.default_lora_targets)

    def transformer(self, s: PlanSettings) -> torch.nn.Module:
        """The transformer with the trainer's two adapters (``lora.add_adapters``), on meta."""
        from . import lora

        def build() -> torch.nn.Module:
            model = meta_diffusers_model(self.configs.components["transformer"], s.weight_dtype)
            with torch.device("meta"):  # peft creates the adapter layers on the current device
                lora.add_adapters(model, s.rank, s.lora_alpha, self.lora_targets(s))
            return model

        return self._cached(("transformer", s.weight_dtype, s.rank, s.lora_alpha, tuple(self.lora_targets(s))), build)

    def vae(self, s: PlanSettings) -> torch.nn.Module:
        return self._cached(
            ("vae", s.weight_dtype), lambda: meta_diffusers_model(self.configs.components["vae"], s.weight_dtype).eval()
        )

    def text_encoders(self, s: PlanSettings) -> dict[str, torch.nn.Module]:
        """The encoders the trainer loads (T5 only with ``load_t5`` where it is optional)."""
        out = {}
        for name, config in self.configs.text_encoders().items():
            is_t5 = (config.get("model_type") == "t5") or "T5" in str(config.get("architectures"))
            if is_t5 and self.arch.t5_optional and not s.load_t5:
                continue
            class_name = self.configs.model_index[name][1]
            out[name] = self._cached(
                (name, s.weight_dtype), lambda c=config, k=class_name: meta_text_encoder(c, s.weight_dtype, k)
            )
        return out

    # --- shapes ----------------------------------------------------------------------------------
    def latent_shape(self, s: PlanSettings) -> tuple[int, ...]:
        return self.arch.latent_shape(self.configs.components["transformer"], self.vae_scale, s.resolution)

    def text_length(self, s: PlanSettings) -> int:
        return self.arch.text_length(self.configs.tokenizer_max_length(), s.max_sequence_length)

    def cond_shapes(self, s: PlanSettings) -> dict[str, tuple[int, ...]]:
        return self.arch.cond_shapes(self.configs.components["transformer"], self.text_length(s))

    def _cond(self, s: PlanSettings, batch: int) -> dict[str, torch.Tensor]:
        return {
            k: torch.randn(batch, *shape, dtype=s.weight_dtype, device="meta")
            for k, shape in self.cond_shapes(s).items()
        }

    # --- traced phases ---------------------------------------------------------------------------
    def _linear(self, key: Any, batch: int, trace_at: Callable[[int], int]) -> int:
        for b in (1, 2):
            if (key, b) not in self._traces:
                self._traces[(key, b)] = trace_at(b)
        one, two = self._traces[(key, 1)], self._traces[(key, 2)]
        return one + (batch - 1) * (two - one)

    def _model_key(self, s: PlanSettings) -> tuple:
        return (s.weight_dtype, s.rank, s.lora_alpha, tuple(self.lora_targets(s)), s.resolution, s.max_sequence_length)

    def train_step_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of one training micro-batch, as ``Trainer.optimise`` runs it (gradients included)."""
        from . import lora
        from .flow import interpolate, target_velocity
        from .loss import orw_cfm_w2_loss

        model = self.transformer(s)

        def trace_at(b: int) -> int:
            def step() -> None:
                latents = torch.randn(b, *self.latent_shape(s), dtype=s.weight_dtype, device="meta")
                noise = torch.randn_like(latents)
                sigmas = torch.rand(b, device="meta")
                x_t = interpolate(latents, noise, sigmas)
                v_target = target_velocity(latents, noise)
                cond = self._cond(s, b)  # the micro-batch's rows, moved from the prompt cache
                v_ref = None
                if s.reference_pass:
                    with lora.reference(model):
                        v_ref = self.arch.velocity(model, x_t, sigmas, cond, s.guidance_scale)
                v_pred = self.arch.velocity(model, x_t, sigmas, cond, s.guidance_scale)
                out = orw_cfm_w2_loss(v_pred, v_target, v_ref, torch.ones(b, device="meta"), 1.0)
                out.loss.backward()

            model.train()
            if s.gradient_checkpointing:
                model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_under_autocast)
            try:
                return trace_peak(step, s.autocast_dtype)
            finally:
                model.disable_gradient_checkpointing()
                for p in model.parameters():
                    p.grad = None

        key = ("train", self._model_key(s), s.gradient_checkpointing, s.reference_pass)
        return self._linear(key, batch or s.train_batch_size, trace_at)

    def sample_step_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of one Euler step of ``sample_ode`` with the sampler adapter (no grad)."""
        from . import lora
        from .flow import euler_step, guided_velocity

        model = self.transformer(s)
        cfg = s.guidance_scale > 1 and self.arch.doubles_batch_for_guidance

        def trace_at(b: int) -> int:
            def step() -> torch.Tensor:
                latents = torch.randn(b, *self.latent_shape(s), dtype=s.weight_dtype, device="meta")
                cond = self._cond(s, b)
                if cfg:
                    uncond = self._cond(s, b)
                    cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                model_in = torch.cat([latents, latents]) if cfg else latents
                sigmas = torch.rand(model_in.shape[0], device="meta")
                with torch.no_grad(), lora.sampler_adapter(model):
                    v = self.arch.velocity(model, model_in, sigmas, cond, s.guidance_scale)
                if cfg:
                    v = guided_velocity(*v.chunk(2), s.guidance_scale)
                return euler_step(latents, v, 1.0, 0.9)

            model.eval()
            return trace_peak(step, s.autocast_dtype)

        return self._linear(("sample", self._model_key(s), cfg), batch or s.sample_batch_size, trace_at)

    def decode_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of ``family.decode`` of a sampling batch (output images included)."""
        vae = self.vae(s)
        vae_cfg = self.configs.components["vae"]
        size = s.resolution // self.vae_scale

        def trace_at(b: int) -> int:
            def decode() -> torch.Tensor:
                latents = torch.randn(
                    b, vae_cfg.get("latent_channels", 4), size, size, dtype=s.weight_dtype, device="meta"
                )
                with torch.no_grad():
                    images = vae.decode(latents, return_dict=False)[0]
                return (images.float() / 2 + 0.5).clamp(0, 1)

            return trace_peak(decode, s.autocast_dtype)

        return self._linear(("decode", s.weight_dtype, s.resolution), batch or s.sample_batch_size, trace_at)

    def encode_peak(self, s: PlanSettings) -> int:
        """Peak bytes of one PromptCache batch through every text encoder (outputs kept, as
        ``encode_prompt`` keeps them until it concatenates)."""
        encoders = self.text_encoders(s)
        key = ("encode", s.weight_dtype, tuple(encoders), s.max_sequence_length)
        if key not in self._traces:

            def encode() -> list:
                outputs = []
                with torch.no_grad():
                    for encoder in encoders.values():
                        is_t5 = encoder.config.model_type == "t5"
                        length = s.max_sequence_length if is_t5 else self.configs.tokenizer_max_length()
                        ids = torch.zeros(PROMPT_CACHE_BATCH, length, dtype=torch.long, device="meta")
                        outputs.append(encoder(ids, output_hidden_states=not is_t5))
                return outputs

            self._traces[key] = trace_peak(encode, s.autocast_dtype) if encoders else 0
        return self._traces[key]

    # --- the plan --------------------------------------------------------------------------------
    def plan(self, s: PlanSettings, runtime_overhead: int = parse_size(DEFAULT_RUNTIME_OVERHEAD)) -> MemoryPlan:
        """Every component of GPU memory during a round, with the phases it is resident in."""
        from . import lora

        all_round = ("sample", "decode", "reward", "train")
        items: list[MemoryItem] = []
        notes: list[str] = []
        model = self.transformer(s)
        dt_bytes = torch.finfo(s.weight_dtype).bits // 8

        # frozen weights
        # buffers count too: SD3's position-embedding table is 384^2 x 1536 values in SD3.5-Medium
        frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        frozen += sum(b.numel() * b.element_size() for b in model.buffers())
        frozen_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        items.append(
            MemoryItem(
                "frozen weights", f"transformer ({frozen_count / 1e9:.2f} B params + buffers)", frozen, all_round
            )
        )
        vae = self.vae(s)
        items.append(
            MemoryItem(
                "frozen weights", f"VAE ({num_parameters(vae) / 1e6:.0f} M params)", parameter_bytes(vae), all_round
            )
        )
        encoders = self.text_encoders(s)
        te_phases = ("encode",) + (all_round if not s.prompt_cache else ())
        for name, encoder in encoders.items():
            label = f"{name} {type(encoder).__name__} ({num_parameters(encoder) / 1e9:.2f} B params)"
            items.append(MemoryItem("frozen weights", label, parameter_bytes(encoder), te_phases))
        reward_models, reward_act = self._reward_models(s, notes)
        for rm in reward_models:
            nbytes = rm.parameters * torch.finfo(REWARD_DTYPES[s.reward_dtype]).bits // 8
            items.append(
                MemoryItem("frozen weights", f"reward: {rm.description} ({s.reward_dtype})", nbytes, all_round)
            )

        # LoRA: two adapters (trained + sampler) in fp32, gradients and AdamW's two moments for the trained one
        trained = sum(p.numel() for p in lora.lora_parameters(model, lora.TRAINED))
        both = sum(p.numel() for p in lora.lora_parameters(model, None))
        items.append(
            MemoryItem("LoRA", f"adapters: trained + sampler ({both / 1e6:.1f} M params, fp32)", 4 * both, all_round)
        )
        items.append(MemoryItem("LoRA", "AdamW state (2 moments, fp32)", 8 * trained, all_round))
        grads = 4 * trained
        items.append(MemoryItem("LoRA", "gradients (fp32)", grads, ("train",)))
        if s.num_processes > 1:
            items.append(MemoryItem("LoRA", "DDP gradient buckets", grads, all_round))

        # the round's data kept on the GPU
        latent_numel = math.prod(self.latent_shape(s))
        items.append(
            MemoryItem(
                "round data",
                f"round latents ({s.samples_per_process} samples)",
                s.samples_per_process * latent_numel * dt_bytes,
                all_round,
            )
        )
        # The prompt embeddings are not round data: optimise takes each micro-batch's rows from the prompt
        # cache (on the CPU), and those are in the training trace below.

        # activations, traced
        train_peak = self.train_step_peak(s)
        ckpt = "with" if s.gradient_checkpointing else "without"
        items.append(
            MemoryItem(
                "activations",
                f"training micro-batch of {s.train_batch_size} ({ckpt} gradient checkpointing)",
                max(train_peak - grads, 0),
                ("train",),
            )
        )
        guided = s.guidance_scale > 1 and self.arch.doubles_batch_for_guidance
        label = f"sampling batch of {s.sample_batch_size}" + (" (x2 for guidance)" if guided else "")
        items.append(MemoryItem("activations", label, self.sample_step_peak(s), ("sample",)))
        items.append(
            MemoryItem("activations", f"VAE decode of {s.sample_batch_size} images", self.decode_peak(s), ("decode",))
        )
        images = s.sample_batch_size * 3 * s.resolution**2 * 4
        items.append(MemoryItem("activations", "reward model (+ the decoded images)", reward_act + images, ("reward",)))
        if encoders:
            items.append(
                MemoryItem(
                    "activations", f"text encoders ({PROMPT_CACHE_BATCH} prompts)", self.encode_peak(s), ("encode",)
                )
            )
        items.append(
            MemoryItem("runtime", "CUDA context, workspaces, allocator slack (assumed)", runtime_overhead, PHASES)
        )
        if not s.prompt_cache:
            notes.append("without the prompt cache the text encoders stay on the GPU for the whole run")
        return MemoryPlan(s, items, notes)

    def _reward_models(self, s: PlanSettings, notes: list[str]) -> tuple[list[RewardModel], int]:
        if not s.reward_on_gpu:
            return [], 0
        models: dict[str, RewardModel] = {}
        for name in s.rewards:
            if ":" in name:
                notes.append(f"reward {name!r} is user code: its GPU memory is not counted")
                continue
            rm = REWARD_MODELS.get(name)
            if rm is not None:
                models.setdefault(rm.key, rm)
        scale = (torch.finfo(REWARD_DTYPES[s.reward_dtype]).bits // 8) / 2  # the table is for fp16
        per_batch = min(s.sample_batch_size, s.reward_batch_size)
        act = int(sum(rm.activation_bytes_per_image for rm in models.values()) * per_batch * scale)
        return list(models.values()), act


# ------------------------------------------------------------------------------------------------
# Knobs
# ------------------------------------------------------------------------------------------------


def _divisors_desc(n: int, below: int) -> list[int]:
    return [d for d in range(min(n, below), 0, -1) if n % d == 0]


def knob_candidates(
    planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int
) -> list[tuple[str, PlanSettings]]:
    """The knobs in the order to try them (cheapest in quality and speed first), each applied to ``s``."""
    out: list[tuple[str, PlanSettings]] = []
    if not s.prompt_cache:
        out.append(("use the prompt cache (the trainer always does)", replace(s, prompt_cache=True)))
    if s.mixed_precision == "no":
        half = "bf16" if planner.arch is ARCHITECTURES.get("FluxTransformer2DModel") else "fp16"
        out.append((f"mixed_precision: {half}", replace(s, mixed_precision=half)))
    if s.reward_on_gpu and s.reward_dtype == "float32" and planner._reward_models(s, [])[0]:
        out.append(("reward_dtype: float16", replace(s, reward_dtype="float16")))
    if not s.gradient_checkpointing:
        out.append(("gradient_checkpointing: true", replace(s, gradient_checkpointing=True)))
    for b in _divisors_desc(s.samples_per_process, s.train_batch_size - 1):
        fits = planner.plan(replace(s, train_batch_size=b), overhead).fits(budget)
        if fits or b == 1:
            out.append(
                (
                    f"train_batch_size: {b} (raise gradient_accumulation_steps to keep the optimizer batch)",
                    replace(s, train_batch_size=b),
                )
            )
            break
    for b in _divisors_desc(s.samples_per_process, s.sample_batch_size - 1):
        fits = planner.plan(replace(s, sample_batch_size=b), overhead).fits(budget)
        if fits or b == 1:
            out.append((f"sample_batch_size: {b}", replace(s, sample_batch_size=b)))
            break
    if s.reward_on_gpu and planner._reward_models(s, [])[0]:
        out.append(("reward_device: cpu", replace(s, reward_on_gpu=False)))
    if s.load_t5 and planner.arch.t5_optional:
        out.append(
            ("load_t5: false (T5 context becomes zeros: changes the model's conditioning)", replace(s, load_t5=False))
        )
    return out


@dataclass
class Advice:
    fits: bool
    first_knob: Optional[str]  # None when it fits already
    steps: list[tuple[str, int]]  # (knob, peak after it), applied cumulatively until it fits
    final_fits: bool


def advise(planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int) -> Advice:
    """If the plan does not fit: the first knob that makes it fit by itself; if none does, the
    knobs applied one after another (each kept only if it lowers the peak) until it fits."""
    if planner.plan(s, overhead).fits(budget):
        return Advice(True, None, [], True)
    candidates = knob_candidates(planner, s, budget, overhead)
    for name, changed in candidates:
        peak = planner.plan(changed, overhead).peak
        if peak <= budget:
            return Advice(False, name, [(name, peak)], True)
    steps, current = [], s
    current_peak = planner.plan(s, overhead).peak
    for _ in range(len(candidates)):
        best = None
        for name, changed in knob_candidates(planner, current, budget, overhead):
            peak = planner.plan(changed, overhead).peak
            if peak < current_peak and not any(name == done for done, _ in steps):
                best = (name, changed, peak)
                break
        if best is None:
            break
        steps.append((best[0], best[2]))
        current, current_peak = best[1], best[2]
        if current_peak <= budget:
            break
    return Advice(False, steps[0][0] if steps else None, steps, current_peak <= budget)


def largest_batch_sizes(
    planner: MemoryPlanner, s: PlanSettings, budget: int, overhead: int, limit: int = 256
) -> tuple[int, int]:
    """The largest ``train_batch_size`` and ``sample_batch_size`` (each with the other as in ``s``)
    whose plan fits ``budget``; 0 when not even 1 fits. Divisibility by the round size is ignored."""

    def largest(field_name: str) -> int:
        best = 0
        for b in range(1, limit + 1):
            if not planner.plan(replace(s, **{field_name: b}), overhead).fits(budget):
                break
            best = b
        return best

    return largest("train_batch_size"), largest("sample_batch_size")


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def format_plan(plan: MemoryPlan, budget: Optional[int] = None, advice: Optional[Advice] = None) -> str:
    s = plan.settings
    precision = {"no": "fp32", "fp16": "fp16 (autocast)", "bf16": "bf16 (autocast)"}[s.mixed_precision]
    lines = [
        f"Memory plan for {s.model} at {s.resolution} px, {precision}, LoRA rank {s.rank}, "
        f"train_batch_size {s.train_batch_size}, sample_batch_size {s.sample_batch_size}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
        f"prompt cache {'on' if s.prompt_cache else 'off'}, T5 {'on' if s.load_t5 else 'off'}, "
        f"{s.num_processes} process(es)",
        "",
        f"{'GiB':>7}  {'group':<15} {'component':<64} resident in",
    ]
    for item in plan.items:
        phases = "all" if item.phases == PHASES else " ".join(item.phases)
        lines.append(f"{gib(item.bytes):>7}  {item.group:<15} {item.name:<64} {phases}")
    lines.append("")
    totals = "  ".join(f"{p} {gib(plan.phase_total(p))}" for p in PHASES)
    lines.append(f"per phase (GiB): {totals}")
    lines.append(f"peak: {gib(plan.peak)} GiB in phase '{plan.peak_phase}' ({PHASE_HELP[plan.peak_phase]})")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if budget is not None:
        if plan.fits(budget):
            lines.append(f"fits in {gib(budget)} GiB ({gib(budget - plan.peak)} GiB to spare)")
        else:
            lines.append(f"does NOT fit in {gib(budget)} GiB ({gib(plan.peak - budget)} GiB over)")
            if advice is not None and advice.first_knob:
                if len(advice.steps) == 1 and advice.final_fits:
                    lines.append(f"first knob: {advice.first_knob} -> peak {gib(advice.steps[0][1])} GiB")
                else:
                    lines.append(f"first knob: {advice.first_knob}; not enough alone, then:")
                    for name, peak in advice.steps:
                        lines.append(f"  - {name} -> peak {gib(peak)} GiB")
                    if not advice.final_fits:
                        lines.append("  still over: a larger GPU, a lower resolution or fewer LoRA targets are needed")
            elif advice is not None:
                lines.append("no knob helps: the frozen weights alone need a larger GPU")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import from_dict, load_yaml, parse_overrides

    parser = argparse.ArgumentParser(
        prog="python -m orw_diffusers.memory",
        description="GPU memory plan of a run config; downloads nothing. "
        "Any run-config key can be overridden with --key value.",
    )
    parser.add_argument("--config", default=None, help="YAML run config (as for train_orw_cfm_w2.py)")
    parser.add_argument("--gpu_memory", default=None, help="GPU memory to fit, e.g. 24GiB, 24GB or 23028MiB")
    parser.add_argument(
        "--num_processes", type=int, default=1, help="processes (GPUs) of the run; sets the round split"
    )
    parser.add_argument("--no_prompt_cache", action="store_true", help="plan as if the text encoders stayed on the GPU")
    parser.add_argument("--runtime_overhead", default=DEFAULT_RUNTIME_OVERHEAD, help="CUDA context + allocator slack")
    parser.add_argument(
        "--find_batch_sizes", action="store_true", help="also print the largest train/sample batch sizes that fit"
    )
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        values = load_yaml(args.config) if args.config else {}
        values.update(parse_overrides(rest))
        cfg = from_dict(values)
        settings = PlanSettings.from_train_config(cfg, args.num_processes, prompt_cache=not args.no_prompt_cache)
        if cfg.mixed_precision not in WEIGHT_DTYPES:
            raise ConfigError(f"mixed_precision: {cfg.mixed_precision!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        budget = parse_size(args.gpu_memory) if args.gpu_memory else None
        overhead = parse_size(args.runtime_overhead)
        planner = MemoryPlanner(load_model_configs(cfg.pretrained_model_name_or_path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = planner.plan(settings, overhead)
    advice = advise(planner, settings, budget, overhead) if budget is not None else None
    print(format_plan(plan, budget, advice))
    if args.find_batch_sizes:
        if budget is None:
            print("error: --find_batch_sizes needs --gpu_memory", file=sys.stderr)
            return 2
        train_max, sample_max = largest_batch_sizes(planner, settings, budget, overhead)
        print(
            f"largest batch sizes that fit {gib(budget)} GiB (the other as configured): "
            f"train_batch_size {train_max}, sample_batch_size {sample_max}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
