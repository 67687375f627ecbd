"""The two LoRA adapters on the one transformer, and the adapter-disabled reference.

Works on a diffusers model (its ``add_adapter`` / ``set_adapter``) and on any plain ``nn.Module``
(peft's ``inject_adapter_in_model``, the adapter switched layer by layer).

- ``default``: the adapter being trained (its parameters are the optimizer's).
- ``sampler``: the adapter that generates each round's samples; a copy of ``default``, refreshed
  every ``sampler_update_interval`` rounds.
- reference: the same transformer with every adapter disabled. There is never a second copy of
  the model.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Iterator, Optional

import torch

TRAINED = "default"
SAMPLER = "sampler"


def add_adapters(
    transformer: torch.nn.Module,
    rank: int,
    lora_alpha: Optional[float],
    target_modules: list[str],
    dropout: float = 0.0,
) -> list[torch.nn.Parameter]:
    """Attach ``default`` (trainable) and ``sampler`` (a copy) and return the trainable parameters.

    ``dropout``: peft's ``lora_dropout`` (active only in train mode, so never while sampling).

    The base weights stay frozen in their dtype; the LoRA parameters of both adapters are fp32,
    as diffusers' ``cast_training_params`` does for the trainable ones.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    for name in (TRAINED, SAMPLER):
        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha if lora_alpha is not None else rank,
            init_lora_weights="gaussian",  # B = 0: a fresh adapter leaves the model unchanged
            target_modules=target_modules,
            lora_dropout=dropout,
        )
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if hasattr(transformer, "add_adapter"):  # diffusers' PeftAdapterMixin
                transformer.add_adapter(config, adapter_name=name)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, transformer, adapter_name=name)
    for param in lora_parameters(transformer, None):
        param.data = param.data.float()
    copy_adapter(transformer, TRAINED, SAMPLER)
    set_active_adapter(transformer, TRAINED)  # peft makes only the active adapter trainable
    return lora_parameters(transformer, TRAINED)


def set_active_adapter(transformer: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the one that runs (and the only trainable one)."""
    if hasattr(transformer, "set_adapter"):  # diffusers' PeftAdapterMixin
        transformer.set_adapter(adapter)
        return
    for layer in tuner_layers(transformer):
        layer.set_adapter(adapter)


def lora_parameters(transformer: torch.nn.Module, adapter: Optional[str]) -> list[torch.nn.Parameter]:
    """The LoRA parameters of ``adapter`` (or of every adapter when None), in module order."""
    return [p for n, p in transformer.named_parameters() if _adapter_of(n) is not None and adapter in (None, _adapter_of(n))]


def _adapter_of(param_name: str) -> Optional[str]:
    # peft names them ``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return parts[i + 1]
    return None


@torch.no_grad()
def copy_adapter(transformer: torch.nn.Module, source: str = TRAINED, target: str = SAMPLER) -> None:
    """Copy the weights of adapter ``source`` into adapter ``target`` (same modules, same rank).

    Through peft's public API: ``get_peft_model_state_dict`` of ``source`` (adapter-free key names),
    then ``set_peft_model_state_dict`` into ``target``. That loads with ``load_state_dict``, which
    copies into the existing tensors: bit-exact, and ``target``'s parameters stay the same objects.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    for name in (source, target):
        if name not in getattr(transformer, "peft_config", {}):
            raise RuntimeError(f"adapter {name!r} is not attached; attached: {sorted(getattr(transformer, 'peft_config', {}))}")
    state = get_peft_model_state_dict(transformer, adapter_name=source, save_embedding_layers=False)
    if not state:
        raise RuntimeError(f"adapter {source!r} has no LoRA parameters to copy")
    result = set_peft_model_state_dict(transformer, state, adapter_name=target)
    missing = [k for k in result.missing_keys if _adapter_of(k) == target]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"adapter {source!r} does not fit adapter {target!r}: "
            f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
        )


@torch.no_grad()
def blend_adapter(transformer: torch.nn.Module, eta: float, source: str = TRAINED, target: str = SAMPLER) -> None:
    """``target <- eta * target + (1 - eta) * source``, weight by weight (eta 0: a copy; 1: ``target`` kept).

    Through peft's public API, as ``copy_adapter``: both adapters' ``get_peft_model_state_dict``, blended
    with ``torch.lerp`` (exact at both ends), loaded into ``target`` with ``set_peft_model_state_dict``.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"blend_adapter: eta {eta!r} must be in [0, 1]")
    new = get_peft_model_state_dict(transformer, adapter_name=source, save_embedding_layers=False)
    old = get_peft_model_state_dict(transformer, adapter_name=target, save_embedding_layers=False)
    if new.keys() != old.keys():
        raise RuntimeError(f"adapter {source!r} does not fit adapter {target!r}")
    blended = {k: torch.lerp(new[k], old[k].to(new[k].dtype), eta).to(old[k].dtype) for k in new}
    set_peft_model_state_dict(transformer, blended, adapter_name=target)


@contextlib.contextmanager
def reference(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model: every adapter disabled, no grad. Re-enables the adapters on exit.

    Does what diffusers' ``disable_adapters`` / ``enable_adapters`` do, on the cached list of peft
    layers instead of a walk over every module (SD3.5-Medium has 3524 of them, on every micro-batch).
    Disabling flips ``requires_grad`` off on the LoRA parameters and enabling turns it back on for
    the active adapter, so the policy pass after this block is trainable again.
    """
    layers = tuner_layers(transformer)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# model -> (its adapters when cached, its peft layers); weak, so that the cache keeps no model alive
_TUNER_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tuner_layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft ``BaseTunerLayer`` modules of ``transformer``, in module order.

    Found once per model and cached; found again when an adapter is added or deleted. A model
    without adapters is an error, as in diffusers.
    """
    # diffusers marks a model with adapters; peft's inject_adapter_in_model leaves its peft_config on a plain module
    if not (getattr(transformer, "_hf_peft_config_loaded", False) or getattr(transformer, "peft_config", None)):
        raise ValueError("No adapter loaded. Please load an adapter first.")
    adapters = tuple((name, id(config)) for name, config in transformer.peft_config.items())
    cached = _TUNER_LAYERS.get(transformer)
    if cached is None or cached[0] != adapters:
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = (adapters, [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)])
        _TUNER_LAYERS[transformer] = cached
    return cached[1]


@contextlib.contextmanager
def sampler_adapter(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the ``sampler`` adapter (no grad); the trained adapter is active again on exit."""
    set_active_adapter(transformer, SAMPLER)
    try:
        with torch.no_grad():
            yield
    finally:
        set_active_adapter(transformer, TRAINED)


def adapter_state_dict(transformer: torch.nn.Module, adapter: str = TRAINED) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's adapter-free key names, as ``save_lora_weights`` expects."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter)


def export_adapter(transformer: torch.nn.Module, adapter: str = TRAINED) -> dict[str, torch.Tensor]:
    """The adapter's weights as saved: CPU, float32, contiguous, peft's adapter-free key names."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(transformer, adapter).items()}


def adapter_metadata(transformer: torch.nn.Module, adapter: str = TRAINED) -> dict:
    """The adapter's LoRA config (rank, alpha, targets), saved beside the weights so loaders get the scale right."""
    return transformer.peft_config[adapter].to_dict()


@torch.no_grad()
def load_adapter_state_dict(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter: str) -> None:
    """Load weights saved by ``adapter_state_dict`` into ``adapter`` (for resuming)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"unexpected LoRA keys for adapter {adapter!r}: {unexpected[:3]}")


@torch.no_grad()
def merged_state_dict(transformer: torch.nn.Module, adapter: str = TRAINED) -> dict[str, torch.Tensor]:
    """The model's weights with ``adapter`` merged in, under the key names of the model without adapters.

    ``[name].base_layer.weight`` + the adapter's delta becomes ``[name].weight``; the other adapters are
    left out. The model is not changed. CPU, float32 for floating tensors.
    """
    tuned = {id(layer) for layer in tuner_layers(transformer)}
    deltas = {}
    for name, layer in transformer.named_modules():
        if id(layer) in tuned and adapter in getattr(layer, "lora_A", {}):
            deltas[f"{name}.base_layer.weight"] = layer.get_delta_weight(adapter)
    out = {}
    for key, value in transformer.state_dict().items():
        if _adapter_of(key) is not None:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        value = value.detach().to("cpu")
        out[key.replace(".base_layer.", ".")] = value.float() if value.is_floating_point() else value
    return out
