"""The package's own exceptions, in a module that imports nothing, so any module can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value. Its message is one line naming the key, the value and what is accepted."""
