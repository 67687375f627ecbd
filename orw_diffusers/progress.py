"""Progress bars fit for a terminal and for a log file: every tqdm of the package is made here.

On a terminal, tqdm as usual. When the bar's stream is not a terminal (a job log, CI, ``| tee``), each
update would become a line of the file, so there inner bars (the batches of one round) are off and the
others print at most one line every ``FILE_INTERVAL_S`` seconds; the numbers are in ``metrics.jsonl``.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

FILE_INTERVAL_S = 60.0  # at most one progress line a minute in a log file


def progress_bar(iterable: Optional[Iterable] = None, *, inner: bool = False, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` for one of the package's loops.

    ``inner``: a bar within another (per batch of a round): shown on a terminal only. ``enabled=False``
    (a process other than the main one) turns the bar off. Update the postfix with
    ``set_postfix(..., refresh=False)``: a forced refresh would bypass the interval.
    """
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    if not on_terminal:
        kwargs.setdefault("mininterval", FILE_INTERVAL_S)
    disable = not enabled or (inner and not on_terminal)
    return tqdm(iterable, disable=disable, **kwargs)
