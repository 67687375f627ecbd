"""``remote_http`` against a small reward server on 127.0.0.1 (a thread in this process)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import pytest
import torch

from orw_diffusers.rewards import RewardError, build_reward
from orw_diffusers.rewards.remote import RemoteRewardError, decode_png

torch.set_num_threads(1)


class RewardServer:
    """Scores each image by its mean brightness plus len(prompt) / 100. ``behaviour(hit)`` may return
    ('sleep', seconds), ('status', code) or ('scores', list) to misbehave on the hit-th request."""

    def __init__(self, behaviour: Optional[Callable[[int], Optional[tuple]]] = None):
        self.hits = 0
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # wakes handlers that sleep, so that closing can join them
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                with server.lock:
                    server.hits += 1
                    hit = server.hits
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                action = behaviour(hit) if behaviour else None
                if action and action[0] == "sleep" and server.stopping.wait(action[1]):
                    return  # the test is over (the client gave up long ago)
                if action and action[0] == "status":
                    self.send_error(action[1], "scripted failure")
                    return
                images = [decode_png(s) for s in body["images"]]
                server.batch_sizes.append(len(images))
                scores = [float(img.mean()) + len(p) / 100 for img, p in zip(images, body["prompts"])]
                if action and action[0] == "scores":
                    scores = action[1]
                payload = json.dumps({"scores": scores}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # handler threads are joined on close: a daemon thread still running torch code at interpreter exit aborts it
        self.httpd.daemon_threads = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "RewardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()  # joins the handler threads


def _remote(url: str, weight: float = 1.0, **kwargs):
    return build_reward([{"name": "remote_http", "weight": weight, "kwargs": {"url": url, **kwargs}}], batch_size=2)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 12, generator=torch.Generator().manual_seed(0))


def _expected(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    pixels = (images * 255).round() / 255  # PNG is 8-bit
    return pixels.mean(dim=(1, 2, 3)) + torch.tensor([len(p) / 100 for p in prompts])


def test_remote_scores_in_chunks():
    images, prompts = _images(5), ["a", "bb", "ccc", "dddd", ""]
    with RewardServer() as server:
        out = _remote(server.url, weight=2.0)(images, prompts)
    assert server.batch_sizes == [2, 2, 1]  # reward_batch_size images per request
    scores = out.components["remote_http"]
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, _expected(images, prompts), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rewards, 2.0 * scores)


def test_remote_timeout_exhausts_the_bounded_retries():
    with RewardServer(lambda hit: ("sleep", 1.5)) as server:
        reward = _remote(server.url, timeout=0.2, max_retries=2, retry_backoff=0.01)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"failed after 3 attempt\(s\).*timed out after 0.2 s") as info:
            reward(_images(2), ["a", "b"])
        elapsed = time.monotonic() - start
    assert isinstance(info.value, RewardError)
    assert server.hits == 3 and elapsed < 1.5
    assert server.url in str(info.value)


def test_remote_retry_after_a_timeout_succeeds():
    images, prompts = _images(2), ["a", "b"]
    with RewardServer(lambda hit: ("sleep", 1.0) if hit == 1 else None) as server:
        out = _remote(server.url, timeout=0.3, max_retries=1, retry_backoff=0.01)(images, prompts)
    assert server.hits == 2
    torch.testing.assert_close(out.rewards, _expected(images, prompts), rtol=0, atol=1e-6)


def test_remote_server_errors_are_retried_but_client_errors_are_not():
    with RewardServer(lambda hit: ("status", 503) if hit == 1 else None) as server:
        out = _remote(server.url, max_retries=1, retry_backoff=0.01)(_images(2), ["a", "b"])
    assert server.hits == 2 and torch.isfinite(out.rewards).all()
    with RewardServer(lambda hit: ("status", 400)) as server:
        with pytest.raises(RemoteRewardError, match="HTTP 400"):
            _remote(server.url, max_retries=3, retry_backoff=0.01)(_images(2), ["a", "b"])
    assert server.hits == 1


def test_remote_null_scores_are_cleaned_and_bad_answers_fail():
    images, prompts = _images(2), ["a", "b"]
    with RewardServer(lambda hit: ("scores", [None, 0.5])) as server:
        out = _remote(server.url)(images, prompts)
    assert out.num_nonfinite == 1 and out.rewards.tolist() == [0.5, 0.5]
    with RewardServer(lambda hit: ("scores", [0.5])) as server:
        with pytest.raises(RemoteRewardError, match="expected a list of 2 scores"):
            _remote(server.url)(images, prompts)


def test_remote_connection_refused_is_a_clear_error():
    with RewardServer() as server:
        url = server.url
    with pytest.raises(RemoteRewardError, match="failed after 2 attempt"):
        _remote(url, timeout=0.5, max_retries=1, retry_backoff=0.01)(_images(1), ["a"])


def test_remote_rejects_non_http_urls():
    with pytest.raises(ValueError, match="http"):
        _remote("ftp://127.0.0.1/score")
