"""Pure round-level rules for staying close to the base: the W2 budget's controller and the reward-hacking alarm.

Plain Python floats in, floats out (no torch, no config), so every rule has a closed-form test.

- ``adapt_coefficient``: PPO's adaptive KL coefficient (Schulman et al. 2017; the proportional form of
  Ziegler et al. 2019) applied to ORW-CFM-W2's alpha and its measured ``w2_loss``.
- ``window_change`` / ``hacking_alarm``: the training reward keeps rising while a held-out reward falls.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence


def adapt_coefficient(alpha: float, measured: float, target: float, rate: float, low: float, high: float) -> float:
    """The next round's alpha from this round's measured W2 against its target (multiplicative, bounded).

    ``alpha * exp(rate * clip(log(measured / target), -1, 1))``, clamped to ``[low, high]``: alpha rises when
    W2 is above the target and falls when below, by at most a factor ``exp(rate)`` per round; a W2 within
    a factor e of the target moves alpha in proportion to log(W2 / target). ``measured == 0`` (a policy
    still equal to the base) counts as far below. Needs ``alpha > 0``, ``target > 0``, ``0 < low <= high``.
    """
    if measured <= 0:
        error = -1.0
    elif math.isfinite(measured):
        error = max(-1.0, min(1.0, math.log(measured / target)))
    else:  # a non-finite W2: pull back as hard as allowed (the loop stops on a non-finite loss anyway)
        error = 1.0
    return min(high, max(low, alpha * math.exp(rate * error)))


def window_change(values: Sequence[float]) -> float:
    """The least-squares line's change across ``values`` (slope per round * (len - 1)); 0 for fewer than 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    var_x = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / var_x
    return slope * (n - 1)


def hacking_alarm(
    train: Sequence[float], held_out: Mapping[str, Sequence[float]], window: int, min_rise: float, min_drop: float
) -> Optional[str]:
    """The alarm rule over the last ``window`` rounds (each series one mean per round, oldest first).

    Fires when the training reward's fitted change over the window is at least ``min_rise`` while some
    held-out reward's is at most ``-min_drop``. Returns the first such held-out name, else None; None
    until the window is full.
    """
    if len(train) < window:
        return None
    if window_change(train[-window:]) < min_rise:
        return None
    for name, values in held_out.items():
        if len(values) >= window and window_change(values[-window:]) <= -min_drop:
            return name
    return None
