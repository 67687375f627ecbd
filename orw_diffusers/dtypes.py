"""The precision names a run accepts and the torch dtype each one means, in one place.

Two vocabularies: Accelerate's ``mixed_precision`` ('no', 'fp16', 'bf16': the frozen weights' dtype) and
torch's dtype names ('float32', 'float16', 'bfloat16': ``reward_dtype``, ``evaluate --dtype``).
torch is imported only when a dtype is asked for, so importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Accelerate's ``mixed_precision`` -> the torch dtype name of the frozen weights.
MIXED_PRECISIONS: dict[str, str] = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: The torch dtype names accepted where a dtype is named directly.
DTYPE_NAMES: tuple[str, ...] = tuple(MIXED_PRECISIONS.values())


def named_dtype(dtype: Union[str, "torch.dtype"]) -> "torch.dtype":
    """'float32' | 'float16' | 'bfloat16' (or one of those torch dtypes) -> the torch dtype; ValueError otherwise."""
    import torch

    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPE_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return getattr(torch, dtype)
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")


def precision_dtype(mixed_precision: str) -> "torch.dtype":
    """'no' | 'fp16' | 'bf16' -> the frozen weights' torch dtype; a one-line ConfigError otherwise."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"mixed_precision: {mixed_precision!r} is not one of {', '.join(MIXED_PRECISIONS)}")
    return named_dtype(MIXED_PRECISIONS[mixed_precision])


def precision_name(dtype: "torch.dtype") -> str:
    """The ``mixed_precision`` whose weights are in ``dtype`` (torch.bfloat16 -> 'bf16'); ``str(dtype)`` if none."""
    name = str(dtype).removeprefix("torch.")
    return next((k for k, v in MIXED_PRECISIONS.items() if v == name), str(dtype))
