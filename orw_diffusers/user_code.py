"""User code named in a config: ``package.module:function`` or ``path/to/file.py:function``.

A leaf (it imports only ``errors``): rewards and model factories both resolve their names here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable

from .errors import ConfigError

_FILE_MODULES: dict[str, Any] = {}  # absolute path of a user file -> its module, run once


def _load_file_module(path: str) -> Any:
    path = os.path.abspath(path)
    if path not in _FILE_MODULES:
        name = f"_orw_user_code_{len(_FILE_MODULES)}_{os.path.splitext(os.path.basename(path))[0]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _FILE_MODULES[path] = module
    return _FILE_MODULES[path]


def resolve_callable(name: str, key: str) -> Callable[..., Any]:
    """``name`` -> the function it names (a file is run once). ``key``: the config key, for the one-line error."""
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"{key}: {name!r} is not 'module:function' or 'file.py:function'")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ConfigError(f"{key}: file {target!r} of {name!r} does not exist")
        module = _load_file_module(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"{key}: cannot import {target!r} of {name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {name!r} names no callable {attr!r} in {target!r}")
    return fn
