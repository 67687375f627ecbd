"""Memory sizes as people write them ('24GiB', '23028MiB') and as the report prints them."""

from __future__ import annotations

import re

from ..errors import ConfigError

GiB = 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'24GiB', '24GB' (10^9), '23028MiB', '1.5 GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: expected a number and a unit such as 24GiB, 24GB or 23028MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: int) -> str:
    """Bytes as GiB with two decimals, the unit of the report."""
    return f"{n / GiB:.2f}"

