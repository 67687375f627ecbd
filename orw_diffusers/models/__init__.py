"""Model families. A new family is one file here plus one entry in ``FAMILIES``."""

from __future__ import annotations

import torch

from .base import Conditioning, FlowFamily, LoadOptions, PromptCache, read_model_index
from .sd3 import SD3Family

FAMILIES: list[type[FlowFamily]] = [SD3Family]


def family_for(pipeline_class_name: str) -> type[FlowFamily]:
    for family in FAMILIES:
        if pipeline_class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(n for f in FAMILIES for n in f.pipeline_class_names)
    from ..config import ConfigError

    raise ConfigError(f"pretrained_model_name_or_path: pipeline {pipeline_class_name!r} is not supported; supported: {supported}")


def load_family(options: LoadOptions, weight_dtype: torch.dtype) -> FlowFamily:
    """Detect the family from ``model_index.json`` and load the pipeline on CPU in ``weight_dtype``."""
    index = read_model_index(options.pretrained_model_name_or_path, options.revision)
    family = family_for(index.get("_class_name", "<missing _class_name>"))
    if weight_dtype not in family.supported_dtypes:
        from ..config import ConfigError

        raise ConfigError(f"mixed_precision: {weight_dtype} is not supported by {family.__name__}")
    return family.load(options, weight_dtype, index)


__all__ = ["Conditioning", "FlowFamily", "LoadOptions", "PromptCache", "SD3Family", "FAMILIES", "load_family", "family_for"]
