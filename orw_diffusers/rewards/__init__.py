"""Rewards: one signature, one registry, one config syntax.

A reward is a callable ``(images: float[B, 3, H, W] in [0, 1], prompts: list[str]) -> float[B]``.
The registry maps a name to a *factory* ``factory(device=..., dtype=..., batch_size=..., **kwargs)
-> reward``; models load when the factory runs (once per process, see ``common.load_once``), never
at import. ``docs/rewards.md`` lists the built-in rewards, their ranges and their weights.

Config syntax (``reward:`` in the run config):
- ``clip_score`` — one reward, weight 1;
- ``{clip_score: 1.0, jpeg_compressibility: 0.1}`` — a weighted sum;
- ``[{name: digit_in, weight: 1.0, kwargs: {digits: [1, 3]}}, ...]`` — with arguments;
- a name may be ``package.module:function`` or ``path/to/file.py:function`` (a user reward callable;
  with ``kwargs`` it is called as ``function(images, prompts, **kwargs)``).

Public API: ``REWARDS``, ``register_reward``, ``reward_gpu_memory`` (``GPUMemory``), ``RewardSpec``,
``parse_reward_spec``, ``resolve_custom``, ``build_reward`` -> ``CompositeReward`` -> ``RewardOutput``,
``clean_scores``, ``RewardError``, ``clear_model_cache``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from ..dtypes import DTYPE_NAMES, named_dtype
from .common import RewardError, clear_model_cache
from ..errors import ConfigError
from ..keys import check_choice, check_positive, key_field
from ..user_code import resolve_callable

__all__ = [
    "REWARDS",
    "CompositeReward",
    "GPUMemory",
    "RewardError",
    "RewardFn",
    "RewardKeys",
    "RewardOutput",
    "RewardSpec",
    "build_reward",
    "build_reward_fn",
    "clean_scores",
    "clear_model_cache",
    "parse_reward_spec",
    "register_reward",
    "resolve_custom",
    "reward_gpu_memory",
    "validate_reward_keys",
]

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


@dataclass
class RewardKeys:
    """The run-config keys of the training reward."""

    reward: Any = key_field(
        "A reward name, {name: weight, ...}, or a list of {name, weight, kwargs}. "
        "Names: the registry's or 'module:function' / 'file.py:function'.",
        "clip_score",
    )
    reward_device: Optional[str] = key_field("Device of the reward models. Default: the training device.", None)
    reward_dtype: str = key_field("dtype of the reward models: 'float32', 'float16' or 'bfloat16'.", "float32")
    reward_batch_size: int = key_field("Images scored per reward-model forward pass.", 32)


def validate_reward_keys(cfg: Any) -> None:
    """``reward``'s names and weights (no model loads), ``reward_dtype`` and ``reward_batch_size``."""
    check_positive(cfg, "reward_batch_size")
    check_choice("reward_dtype", cfg.reward_dtype, DTYPE_NAMES)
    parse_reward_spec(cfg.reward)


_PLACEMENT = ("device", "dtype", "batch_size")


def _lazy(module: str, attr: str, placement: tuple[str, ...] = _PLACEMENT) -> Callable[..., RewardFn]:
    """A factory that imports ``orw_diffusers.rewards.<module>.<attr>`` on first use, so importing
    this package never imports open_clip or transformers. ``placement`` names the placement
    arguments the target accepts; the others are dropped (the digit CNN takes only ``device``)."""

    def factory(device: Any = "cpu", dtype: Any = torch.float32, batch_size: int = 32, **kwargs: Any) -> RewardFn:
        given = {"device": device, "dtype": dtype, "batch_size": batch_size}
        target = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        return target(**{k: given[k] for k in placement}, **kwargs)

    factory.__qualname__ = factory.__name__ = attr
    factory.__doc__ = f"{__name__}.{module}.{attr} (imported when first built)"
    return factory


@dataclass(frozen=True)
class GPUMemory:
    """What a reward's model holds on the GPU, for the memory planner (``python -m orw_diffusers.memory``).
    Activations: peak no-grad bytes per 224 px image in fp16, measured once with ``memory.trace_peak`` on the
    model's architecture."""

    key: str  # rewards sharing a key share one loaded model (see common.load_once)
    description: str
    parameters: int
    activation_bytes_per_image: int


_VIT_H = GPUMemory("open_clip:ViT-H-14:laion2b_s32b_b79k", "open_clip ViT-H-14", 986_109_441, 8 * 2**20)
_HPSV2 = GPUMemory("open_clip:ViT-H-14:hpsv2", "open_clip ViT-H-14 (HPSv2 weights)", 986_109_441, 8 * 2**20)
_VIT_L_AESTHETIC = GPUMemory("open_clip:ViT-L-14", "open_clip ViT-L-14 + aesthetic MLP", 428_544_482, 9 * 2**20)
_PICKSCORE = GPUMemory("hf:pickscore", "CLIP ViT-H-14 (PickScore)", 986_109_441, 8 * 2**20)
_DIGIT_CNN = GPUMemory("digits", "digit CNN", 30_000, 2**20)

# name -> (factory(device=..., dtype=..., batch_size=..., **kwargs) -> reward, its GPU memory or None for none).
# Every factory accepts the three placement arguments (some ignore them); models load when the factory runs.
_BUILT_IN: dict[str, tuple[Callable[..., RewardFn], Optional[GPUMemory]]] = {
    "clip_score": (_lazy("clip", "clip_score"), _VIT_H),
    "clip_zero_shot": (_lazy("clip", "clip_zero_shot"), _VIT_H),
    "hpsv2": (_lazy("clip", "hpsv2"), _HPSV2),
    "aesthetic": (_lazy("aesthetic", "aesthetic"), _VIT_L_AESTHETIC),
    "pickscore": (_lazy("pickscore", "pickscore"), _PICKSCORE),
    "jpeg_compressibility": (_lazy("jpeg", "jpeg_compressibility"), None),  # PIL on the CPU
    "jpeg_incompressibility": (_lazy("jpeg", "jpeg_incompressibility"), None),
    "remote_http": (_lazy("remote", "remote_http"), None),  # another machine
    "digit_even": (_lazy("digits", "digit_even", placement=("device",)), _DIGIT_CNN),
    "digit_in": (_lazy("digits", "digit_in", placement=("device",)), _DIGIT_CNN),
    "digit_judge_even": (_lazy("digits", "digit_judge_even", placement=()), None),  # an SVC on the CPU
    "digit_judge_in": (_lazy("digits", "digit_judge_in", placement=()), None),
}
REWARDS: dict[str, Callable[..., RewardFn]] = {name: factory for name, (factory, _) in _BUILT_IN.items()}
_GPU_MEMORY: dict[str, Optional[GPUMemory]] = {name: memory for name, (_, memory) in _BUILT_IN.items()}
#: ``register_reward``'s default: the reward's GPU memory is not known (the planner asks for it)
UNKNOWN = GPUMemory("unknown", "unknown", 0, 0)


def register_reward(name: str, factory: Callable[..., RewardFn], gpu_memory: Optional[GPUMemory] = UNKNOWN) -> None:
    """Add ``factory(device=..., dtype=..., batch_size=..., **kwargs) -> reward`` under ``name``.

    ``gpu_memory``: what its model holds on the GPU (None: nothing), for the memory planner.
    """
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':'")
    REWARDS[name] = factory
    _GPU_MEMORY[name] = gpu_memory


def reward_gpu_memory(name: str) -> Optional[GPUMemory]:
    """The registered reward's GPU memory (None: it uses none); ``LookupError`` when the registry has no size."""
    memory = _GPU_MEMORY.get(name, UNKNOWN) if name in REWARDS else UNKNOWN
    if memory is UNKNOWN:
        raise LookupError(f"reward {name!r}: its GPU memory is not registered")
    return memory


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _config_error(msg: str) -> Exception:
    return ConfigError(msg)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise _config_error(f"reward: {name!r} is not a reward name")
    if ":" in name:
        return name  # user callable; resolved (and checked) by resolve_custom
    if name not in REWARDS:
        raise _config_error(
            f"reward: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}, "
            f"or 'module:function' / 'file.py:function'"
        )
    return name


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise _config_error(f"reward: weight of {name!r} is {weight!r}; expected a finite number")
    return float(weight)


def parse_reward_spec(spec: Any) -> list[RewardSpec]:
    """Normalise the config's ``reward`` value to a list of RewardSpec; loads nothing heavy."""
    if isinstance(spec, str):
        specs = [RewardSpec(_check_name(spec))]
    elif isinstance(spec, dict) and spec:
        specs = [RewardSpec(_check_name(n), _check_weight(n, w)) for n, w in spec.items()]
    elif isinstance(spec, list) and spec:
        specs = []
        for item in spec:
            if isinstance(item, str):
                specs.append(RewardSpec(_check_name(item)))
                continue
            if not isinstance(item, dict) or "name" not in item:
                raise _config_error(f"reward: list item {item!r} must be a name or a mapping with 'name'")
            extra = set(item) - {"name", "weight", "kwargs"}
            if extra:
                raise _config_error(
                    f"reward: unknown field(s) {sorted(extra)} in {item!r}; accepted: name, weight, kwargs"
                )
            name = _check_name(item["name"])
            kwargs = item.get("kwargs") or {}
            if not isinstance(kwargs, dict):
                raise _config_error(f"reward: kwargs of {name!r} must be a mapping, got {kwargs!r}")
            specs.append(RewardSpec(name, _check_weight(name, item.get("weight", 1.0)), dict(kwargs)))
    else:
        raise _config_error(f"reward: {spec!r} must be a name, a {{name: weight}} mapping or a list")
    for s in specs:
        if ":" in s.name:
            resolve_custom(s.name)
    return specs


def resolve_custom(name: str) -> Callable[..., torch.Tensor]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function (a file is run once)."""
    return resolve_callable(name, "reward")


def build_reward_fn(
    spec: RewardSpec,
    device: Union[torch.device, str] = "cpu",
    dtype: Union[torch.dtype, str] = torch.float32,
    batch_size: int = 32,
) -> RewardFn:
    """One reward. Registered factories get ``device``, ``dtype`` and ``batch_size`` (a spec's
    kwargs may override them per reward); user callables get only their kwargs."""
    if ":" in spec.name:
        fn = resolve_custom(spec.name)
        return functools.partial(fn, **spec.kwargs) if spec.kwargs else fn
    placement = {"device": device, "dtype": dtype, "batch_size": batch_size}
    return REWARDS[spec.name](**{**placement, **spec.kwargs})


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # [B] float32 on CPU, the weighted sum, all finite
    components: dict[str, torch.Tensor]  # name -> [B] float32 on CPU (after cleaning), unweighted
    num_nonfinite: int  # scores replaced by the batch minimum, over all components


class CompositeReward:
    """A weighted sum of rewards, each cleaned of non-finite scores before summing.

    ``names[i]`` labels ``specs[i]`` in ``RewardOutput.components`` (and in logs as
    ``reward/<name>_mean``): the reward name, or the function name of a user callable, with
    ``_<i>`` appended when a name occurs more than once.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        device: Union[torch.device, str] = "cpu",
        dtype: Union[torch.dtype, str] = torch.float32,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype, self.batch_size = torch.device(device), named_dtype(dtype), batch_size
        self.specs = list(specs)
        self.names = [self._label(s, i) for i, s in enumerate(self.specs)]
        self.fns = [build_reward_fn(s, self.device, self.dtype, batch_size) for s in self.specs]
        embedders = [fn.embed for fn in self.fns if callable(getattr(fn, "embed", None))]
        if embedders:  # the trainer's diversity metric uses the first component's embedding space
            self.embed = embedders[0]

    def _label(self, spec: RewardSpec, i: int) -> str:
        base = spec.name.rpartition(":")[2]
        return base if [s.name for s in self.specs].count(spec.name) == 1 else f"{base}_{i}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """images: [B, 3, H, W] in [0, 1]; returns the total and its parts, all float32 [B] on CPU."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"rewards take images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        images = images.to(self.device, torch.float32)
        total = torch.zeros(images.shape[0])
        components: dict[str, torch.Tensor] = {}
        num_nonfinite = 0
        for spec, name, fn in zip(self.specs, self.names, self.fns):
            scores = torch.as_tensor(fn(images, list(prompts))).detach().float().cpu().reshape(-1)
            if scores.shape[0] != images.shape[0]:
                raise RewardError(f"reward {name!r} returned {scores.shape[0]} scores for {images.shape[0]} images")
            scores, bad = clean_scores(scores, name)
            num_nonfinite += bad
            components[name] = scores
            total += spec.weight * scores
        return RewardOutput(total, components, num_nonfinite)


def clean_scores(scores: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """Replace non-finite scores by the minimum finite score of the batch, with a warning naming
    the reward; returns (scores, how many were replaced). No finite score at all: RewardError."""
    finite = torch.isfinite(scores)
    bad = int((~finite).sum())
    if bad == 0:
        return scores, 0
    if bad == scores.numel():
        raise RewardError(
            f"reward {name!r} returned no finite score for a batch of {scores.numel()} images "
            f"(values like {scores[:4].tolist()}); check the reward model's inputs and weights"
        )
    logging.getLogger(__name__).warning(
        "reward %r returned %d non-finite score(s) of %d; replaced by the batch minimum", name, bad, scores.numel()
    )
    return torch.where(finite, scores, scores[finite].min()), bad


def build_reward(
    spec: Any,
    device: Union[torch.device, str] = "cpu",
    dtype: Union[torch.dtype, str] = torch.float32,
    batch_size: int = 32,
) -> CompositeReward:
    """The config's ``reward`` value (or an already parsed ``list[RewardSpec]``) -> a loaded CompositeReward.

    ``device``/``dtype``/``batch_size`` are the config's ``reward_device`` (the trainer passes the
    training device when that is None), ``reward_dtype`` and ``reward_batch_size``.
    """
    if isinstance(spec, list) and spec and all(isinstance(s, RewardSpec) for s in spec):
        specs = spec
    else:
        specs = parse_reward_spec(spec)
    return CompositeReward(specs, device, dtype, batch_size)
