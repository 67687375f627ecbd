"""How a part of the package declares its run-config keys: a small dataclass of ``key_field(...)`` fields next to
its code (``objectives/orw.py``'s ``ORWKeys``, ``policies/lora.py``'s ``LoRAKeys``, ``hub.py``'s ``HubKeys``, ...).
``config.py`` composes the flat ``TrainConfig`` from these blocks; this module imports nothing of the package but its
errors, so a part can declare its keys without importing ``config.py``.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import ConfigError


def key_field(
    text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, path: bool = False
) -> Any:
    """One config key: ``text`` is its help string (its row of docs/configuration.md), ``default`` its default
    (``factory`` for a mutable one); ``path``: a local path, whose '~' and $VARIABLES are expanded as a shell would."""
    metadata = {"help": text, "path": path}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class KeyBlock:
    """A part's keys as the run config lists them: ``keys`` is the part's dataclass of ``key_field`` fields."""

    title: str
    keys: type
    #: keys declared by another block that this part also reads (an objective's shared keys)
    shared: tuple[str, ...] = ()

    @property
    def owner(self) -> str:
        """The file that declares the keys, e.g. 'orw_diffusers/objectives/orw.py'."""
        module = sys.modules[self.keys.__module__]
        path = self.keys.__module__.replace(".", "/")
        return f"{path}/__init__.py" if hasattr(module, "__path__") else f"{path}.py"


def key_names(keys: Optional[type]) -> tuple[str, ...]:
    """The names of a key block's fields, in their declared order (none for ``None``)."""
    return tuple(f.name for f in dataclasses.fields(keys)) if keys is not None else ()


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name}: {value!r} must be a positive integer")


def check_off_or_count(cfg: Any, *names: str) -> None:
    """Counts where 0 (or null) turns a feature off."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}: {value!r} must be >= 0 (0 turns it off)")


def is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert one value of key ``name`` to its declared type; YAML already typed most of them."""
    if is_optional(tp):
        if value is None:
            return None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(name, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value
