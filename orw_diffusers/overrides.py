"""How a run config is read: the YAML file, ``--key value`` overrides as diffusers' scripts take them, and
diffusers' key names (``ALIASES``). Values come out as written; ``config.from_dict`` checks names and types."""

from __future__ import annotations

import os
import typing
from typing import Any, Callable

import yaml

from .errors import ConfigError
from .keys import is_optional


# diffusers' weighting_scheme values that mean one of our sigma_sampling values ('none': uniform timesteps).
_WEIGHTING_SCHEMES = {"none": "uniform", "uniform": "uniform", "logit_normal": "logit_normal"}


def _weighting_scheme(value: Any) -> Any:
    if value not in _WEIGHTING_SCHEMES:
        raise ConfigError(
            f"weighting_scheme: {value!r} is not supported; accepted: none or uniform (sigma_sampling: uniform), "
            f"logit_normal"
        )
    return _WEIGHTING_SCHEMES[value]


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


#: diffusers' training-script names where ours differ: alias -> (our key, how the value converts).
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "validation_prompt": ("validation_prompts", lambda v: [v] if isinstance(v, str) else v),
    "hub_private_repo": ("hub_private", lambda v: v),
    "lora_layers": ("lora_target_modules", _comma_list),
    "weighting_scheme": ("sigma_sampling", _weighting_scheme),
}

# Keys of diffusers' scripts that have no equivalent here, and what to set instead.
_NO_EQUIVALENT = {
    "num_train_epochs": "the length of a run is num_epochs (online rounds: sample -> reward -> optimise)",
    "max_train_steps": "the length of a run is num_epochs (online rounds); a round's optimizer steps are derived "
    "from the batch sizes and logged at start",
}


def apply_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with diffusers' names (``ALIASES``) renamed to ours and their values converted."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in _NO_EQUIVALENT:
            raise ConfigError(f"{key}: not a key of this trainer; {_NO_EQUIVALENT[key]}: set num_epochs instead")
        if key in ALIASES:
            target, convert = ALIASES[key]
            if target in values:
                raise ConfigError(f"{key}: set either {key} (diffusers' name) or {target}, not both")
            key, value = target, convert(value)
        out[key] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of keys to values")
    return values


def _kind(key: str, hints: dict[str, Any]) -> tuple[str, bool]:
    """How the command line reads ``key``: ('bool' | 'list' | 'value', whether its words are strings)."""
    if key in ALIASES:
        return ("bool", False) if key == "hub_private_repo" else ("value", True)
    if key not in hints:
        return "value", False  # an unknown key: from_dict names it
    tp = hints[key]
    if is_optional(tp):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        return "bool", False
    if typing.get_origin(tp) is list:
        return "list", typing.get_args(tp)[0] is str
    return "value", tp is str


def _parse_word(raw: str, is_str: bool) -> Any:
    """One command-line word as YAML (numbers, null, [lists], {mappings}); a string key keeps words such as
    'yes', '1' or 'a: b' as written."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if is_str and value is not None and not isinstance(value, (str, list)):
        return raw
    return value


def read_overrides(argv: list[str], hints: dict[str, Any]) -> dict[str, Any]:
    """Command-line overrides, read as diffusers' scripts take them:

    - ``--key value`` or ``--key=value``; values are YAML (``--reward '{clip_score: 1.0}'``);
    - booleans bare (``--gradient_checkpointing``), with a value (``--push_to_hub false``) or ``--no_<key>``;
    - lists as separate words (``--validation_prompts "a cat" "a dog"``) or one YAML list (``'[a, b]'``).

    Keys come back with ``-`` written ``_``; diffusers' names (``ALIASES``) are converted by ``from_dict``.
    ``hints``: the run config's type of each key, which says how many words a key takes.
    """
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides are written --key value")
        key, has_value, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        words = []  # the words up to the next --key
        while not has_value and i < len(argv) and not argv[i].startswith("--"):
            words.append(argv[i])
            i += 1
        kind, is_str = _kind(key, hints)
        negated = key.startswith("no_") and _kind(key[3:], hints)[0] == "bool" and kind != "bool"
        if negated:
            if has_value or words:
                raise ConfigError(f"--{key}: takes no value (it sets {key[3:]} to false)")
            values[key[3:]] = False
            continue
        if has_value:
            words = [raw]
        if kind == "bool" and not words:
            values[key] = True
        elif not words:
            raise ConfigError(f"--{key}: missing value")
        elif kind == "list" and len(words) > 1:
            values[key] = [raw_word if is_str else _parse_word(raw_word, False) for raw_word in words]
        elif len(words) > 1:
            raise ConfigError(
                f"--{key}: one value expected, got {len(words)} ({' '.join(words)!r}); quote a value with spaces"
            )
        else:
            values[key] = _parse_word(words[0], is_str)
    return values
