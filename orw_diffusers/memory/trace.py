"""Counting the bytes a piece of model code allocates, without weights, a GPU or any compute.

The models are built from their configs on PyTorch's ``meta`` device (shapes and dtypes only), and
``trace_peak`` runs a phase's real forward (and backward) on meta tensors while a dispatch mode
counts the bytes of every tensor alive after each operator. Two details make this match a GPU:

- attention runs through the fused (flash) kernel's signature, which keeps only the output and the
  log-sum-exp for backward, as PyTorch's SDPA does on CUDA and on CPU (meta would otherwise take
  the math path and count the full attention matrix);
- with ``mixed_precision`` fp16/bf16 the trainer runs under CUDA autocast; ``_AutocastEmulation``
  casts the inputs of the same operator lists (matmuls to half, norms and reductions to fp32).

diffusers, transformers and accelerate are imported only by the functions that build models.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError


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

