"""``remote_http``: score images on a reward server over HTTP (standard library only).

Protocol (one request per chunk of ``batch_size`` images)::

    POST <url>   Content-Type: application/json
    {"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...]}     # 8-bit RGB PNGs, as generated
    -> 200 {"scores": [0.71, ...]}                                   # one number (or null) per image

Timeouts, connection errors and HTTP 429 / 5xx are retried up to ``max_retries`` times with
exponential backoff; then :class:`RemoteRewardError` says what failed. Other HTTP errors and
malformed answers fail at once. ``null`` / NaN scores come back as NaN, which the composite
reward replaces and counts like any other non-finite score.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Union

import torch

from .common import RewardError, chunks


class RemoteRewardError(RewardError):
    """The reward server did not answer usably."""


def encode_png(images: torch.Tensor) -> list[str]:
    """float [B, 3, H, W] in [0, 1] -> base64 strings of 8-bit RGB PNGs."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_png(encoded: str) -> torch.Tensor:
    """A base64 PNG -> float [3, H, W] in [0, 1] (for servers written in Python, and tests)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _is_timeout(error: BaseException) -> bool:
    reason = getattr(error, "reason", error)
    return isinstance(reason, (socket.timeout, TimeoutError))


class RemoteHTTPReward:
    """POSTs chunks of images + prompts to ``url``; returns the scores as float32 [B] on CPU."""

    def __init__(
        self,
        url: str,
        timeout: float,
        max_retries: int,
        retry_backoff: float,
        batch_size: int,
        headers: Optional[dict[str, str]] = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote_http: url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or max_retries < 0 or retry_backoff < 0:
            raise ValueError("remote_http: timeout must be > 0, max_retries and retry_backoff >= 0")
        self.url, self.timeout, self.max_retries, self.retry_backoff = (
            url,
            float(timeout),
            int(max_retries),
            retry_backoff,
        )
        self.batch_size = batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        scores: list[float] = []
        for part in chunks(images.shape[0], self.batch_size):
            body = json.dumps({"prompts": list(prompts[part]), "images": encode_png(images[part])}).encode()
            scores.extend(self._parse(self._post(body), part.stop - part.start))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body: bytes) -> bytes:
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:  # an answer, but an error status
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise RemoteRewardError(f"remote_http: {self.url} answered HTTP {e.code}: {detail}") from None
                last_error = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError) as e:  # timeouts, refused / reset connections
                last_error = f"timed out after {self.timeout:g} s" if _is_timeout(e) else f"{type(e).__name__}: {e}"
        raise RemoteRewardError(
            f"remote_http: POST {self.url} failed after {attempts} attempt(s) (max_retries={self.max_retries}); "
            f"last error: {last_error}"
        )

    def _parse(self, raw: bytes, expected: int) -> list[float]:
        try:
            answer = json.loads(raw)
            values = answer["scores"]
            if not isinstance(values, list) or len(values) != expected:
                raise ValueError(f"expected a list of {expected} scores, got {values!r:.200}")
            return [math.nan if v is None else float(v) for v in values]
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteRewardError(f"remote_http: bad answer from {self.url} ({e}): {raw[:200]!r}") from None


def remote_http(
    device: Union[str, torch.device] = "cpu",
    dtype: Any = torch.float32,
    batch_size: int = 32,
    url: str = "",
    timeout: float = 60.0,
    max_retries: int = 2,
    retry_backoff: float = 1.0,
    headers: Optional[dict[str, str]] = None,
) -> RemoteHTTPReward:
    """A reward computed by a server at ``url`` (see the module docstring for the protocol).
    ``timeout`` is per attempt in seconds; ``device`` and ``dtype`` are unused."""
    return RemoteHTTPReward(url, timeout, max_retries, retry_backoff, batch_size, headers)
