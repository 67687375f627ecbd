"""Models behind the model seam. A new pipeline family is one file here plus one entry in ``FAMILIES``."""

from __future__ import annotations

from typing import Optional

import torch

from .base import Conditioning, FlowModel
from .pipeline import LoadOptions, PipelineFamily, PromptCache, read_model_index
from .flux import FluxFamily
from .sd3 import SD3Family
from ..dtypes import MIXED_PRECISIONS, precision_dtype, precision_name
from ..errors import ConfigError

FAMILIES: list[type[PipelineFamily]] = [SD3Family, FluxFamily]


def family_for(pipeline_class_name: str) -> type[PipelineFamily]:
    for family in FAMILIES:
        if pipeline_class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(n for f in FAMILIES for n in f.pipeline_class_names)
    raise ConfigError(f"pretrained_model_name_or_path: pipeline {pipeline_class_name!r} is not supported; supported: {supported}")


def load_family(options: LoadOptions, weight_dtype: torch.dtype) -> PipelineFamily:
    """Detect the family from ``model_index.json`` and load the pipeline on CPU in ``weight_dtype``."""
    index = read_model_index(options.pretrained_model_name_or_path, options.revision)
    family = family_for(index.get("_class_name", "<missing _class_name>"))
    _check_dtype(family, precision_name(weight_dtype), weight_dtype)
    return family.load(options, weight_dtype, index)


def _check_dtype(family: type[PipelineFamily], mixed_precision: str, weight_dtype: torch.dtype) -> None:
    if weight_dtype not in family.supported_dtypes:
        why = f": {family.precision_note}" if family.precision_note else ""
        raise ConfigError(f"mixed_precision: {mixed_precision} is not supported by {family.__name__}{why}")


def check_model_precision(path_or_id: str, revision: Optional[str], mixed_precision: str) -> None:
    """Refuse a ``mixed_precision`` the checkpoint's family cannot run (e.g. FLUX + fp16), before anything loads.

    ``mixed_precision`` is the value the run will use: ``config.resolved_mixed_precision`` (the config's, else
    Accelerate's), so a launch with ``--mixed_precision fp16`` is refused as a config's ``fp16`` is.

    Reads only ``model_index.json``. Raises ``ConfigError`` (one line) for an unsupported pair or an
    unsupported pipeline class. When ``model_index.json`` cannot be read (no such file, hub
    unreachable) it returns silently: ``load_family`` reports that, and checks the dtype again.
    """
    if mixed_precision not in MIXED_PRECISIONS:
        return  # config validation reports unknown choices itself
    try:
        index = read_model_index(path_or_id, revision)
    except Exception:  # noqa: BLE001 - network, permissions, missing file: all reported when loading
        return
    family = family_for(index.get("_class_name", "<missing _class_name>"))
    _check_dtype(family, mixed_precision, precision_dtype(mixed_precision))


__all__ = [
    "Conditioning", "FlowModel", "PipelineFamily", "LoadOptions", "PromptCache", "SD3Family", "FluxFamily", "FAMILIES",
    "load_family", "family_for", "check_model_precision",
]  # fmt: skip
