"""The configs of a diffusers pipeline, without weights: shipped public configs or a local directory.

A local diffusers directory is read as it is (``model_index.json`` and each component's
``config.json``); the hub ids in ``SHIPPED_MODELS`` map to the public configs shipped in
``orw_diffusers/model_configs/``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import ConfigError

# The shipped configs are package data of ``orw_diffusers`` (pyproject's package-data), one level up.
MODEL_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs")
# Hub id -> shipped file of public configs (model_index.json + every component's config.json).
SHIPPED_MODELS: dict[str, str] = {
    "stabilityai/stable-diffusion-3.5-medium": "stable-diffusion-3.5-medium.json",
    "stabilityai/stable-diffusion-3.5-large": "stable-diffusion-3.5-large.json",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev.json",
}


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

