"""The Hub upload of a finished run; its model card is written by ``card.py``.

Everything here reads the run's files on disk (``config.yaml``, ``metrics.jsonl``,
``samples/*.png``, the weights), so the upload can be retried long after training:
``python -m orw_diffusers.push OUTPUT_DIR --hub_model_id ...``.

With ``push_to_hub`` the training script calls ``prepare_repo`` before the model loads: it checks the
token (``whoami``) and creates the repo, so a missing token fails in the first seconds, not after training.

The Hub token is never handled here: ``huggingface_hub`` reads it from ``HF_TOKEN`` or from
``hf auth login``, and error messages are scrubbed of anything token-like. The API object can be
injected (tests pass a fake that records calls).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .card import (
    CARD_NAME, card_image, load_hint, saved_weights, summarize_run, validation_images, write_model_card,
)  # fmt: skip
from .card import read_metrics  # noqa: F401 - the benchmarks read metrics.jsonl as ``hub.read_metrics``
from .errors import ConfigError
from .keys import key_field
from .objectives import objective_class
from .weight_files import WEIGHT_FILES

#: files of output_dir that go to the Hub besides the weights; checkpoints/, logs/ and all but the card's
#: images stay local
UPLOADED_FILES = [CARD_NAME, "config.yaml", "metrics.jsonl"]
#: remote files removed by every push before the new ones land: the sample images of an earlier push
STALE_PATTERNS = ["samples/*"]
#: exit status of the training script and of ``orw_diffusers.push`` when the upload fails
UPLOAD_FAILED_EXIT_CODE = 3
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{6,}")


class HubUploadError(RuntimeError):
    """The upload failed; the files are still on disk and the message ends with the retry command."""


def retry_command(output_dir: str, repo_id: str, private: bool = False) -> str:
    cmd = f"python -m orw_diffusers.push {shlex.quote(output_dir)} --hub_model_id {shlex.quote(repo_id)}"
    return cmd + (" --private" if private else "")


def upload_patterns(output_dir: str) -> list[str]:
    """The files of ``output_dir`` that are uploaded: the weights, the card, the config, the metrics
    and the card's images (its sample grid and the widget's validation grids)."""
    image = card_image(output_dir)
    images = ([image] if image else []) + [path for _, path in validation_images(output_dir)]
    weights = saved_weights(output_dir)
    return ([weights.file] if weights else []) + UPLOADED_FILES + list(dict.fromkeys(images))


def _reason(e: BaseException) -> str:
    """``Type: first line`` of an exception, with anything token-like replaced: safe to print."""
    first = str(e).splitlines()[0] if str(e) else ""
    return _TOKEN_LIKE.sub("hf_***", f"{type(e).__name__}: {first}".rstrip(": "))


@dataclass
class HubKeys:
    """The run-config keys of the upload to the Hub."""

    push_to_hub: bool = key_field(
        "After training, upload the weights and model card to the Hub repo hub_model_id (token from HF_TOKEN or "
        "`huggingface-cli login`).",
        False,
    )
    hub_model_id: Optional[str] = key_field(
        "Hub repo to push to: 'name' (your namespace) or 'namespace/name'. Default: output_dir's folder name.", None
    )
    hub_private: bool = key_field(
        "Create the Hub repo as private (if it does not exist yet). diffusers' hub_private_repo is read as this key.",
        False,
    )


def validate_hub_keys(cfg: Any) -> None:
    """The repo id a push would use, checked offline (the token and the repo are checked by ``prepare_repo``)."""
    if cfg.push_to_hub or cfg.hub_model_id is not None:
        check_repo_id(default_repo_id(cfg))  # hub_model_id, else output_dir's name


def default_repo_id(cfg: Any) -> str:
    """``hub_model_id``, else the basename of ``output_dir`` (a repo in the token's own namespace)."""
    return cfg.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(cfg.output_dir)))


def check_repo_id(repo_id: str, key: str = "hub_model_id") -> None:
    """``huggingface_hub.utils.validate_repo_id`` as a one-line ``ConfigError`` naming ``key``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(
            f"{key}: {repo_id!r} is not a Hub repo id: use 'name' or 'namespace/name' with letters, digits, "
            f"'-', '_', '.' (not starting or ending with '-' or '.', at most 96 characters) ({_reason(e)})"
        ) from None


def prepare_repo(cfg: Any, api: Any = None, main_process: bool = True) -> Optional[str]:
    """With ``push_to_hub``, before the model loads: check the token (``whoami``) and create the repo.
    Only the main process talks to the Hub (``main_process``); the others return None.

    ``hub_model_id`` defaults to ``output_dir``'s basename; a bare name goes to the token's namespace.
    Sets ``cfg.hub_model_id`` to the full ``namespace/name`` and returns it (None without ``push_to_hub``).
    A missing, invalid or read-only token, or a repo that cannot be created, raises a one-line
    ``ConfigError`` (the training script exits 2) that never contains the token.
    """
    if not (cfg.push_to_hub and main_process):
        return None
    repo_id = default_repo_id(cfg)
    check_repo_id(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the login cache, never from us
    try:
        user = api.whoami()
    except Exception as e:  # noqa: BLE001 - no token, a revoked one, no network: all stop the run now
        raise ConfigError(
            f"push_to_hub: the Hub token check (whoami) failed ({_reason(e)}); log in with `hf auth login` or set "
            f"HF_TOKEN to a token with write access, or set push_to_hub: false"
        ) from None
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConfigError(
            "push_to_hub: the Hub token is read-only; use a token with write access, or set push_to_hub: false"
        )
    if "/" not in repo_id and user.get("name"):
        repo_id = f"{user['name']}/{repo_id}"
    try:
        url = api.create_repo(repo_id, private=cfg.hub_private, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - no permission in that namespace, a name taken by a dataset, ...
        raise ConfigError(f"hub_model_id: the Hub repo {repo_id!r} cannot be created ({_reason(e)})") from None
    cfg.hub_model_id = getattr(url, "repo_id", None) or repo_id
    return cfg.hub_model_id


def push_to_hub(output_dir: str, repo_id: str, private: bool = False, api: Any = None) -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder`` of the files in ``upload_patterns``; the
    remote sample images of an earlier push (``STALE_PATTERNS``) are deleted in the same commit.

    The weights and the card must already be on disk. Any failure raises ``HubUploadError`` whose
    message ends with the command that retries; nothing local is touched. Returns the repo id.
    """
    if saved_weights(output_dir) is None:
        raise FileNotFoundError(f"{output_dir} holds none of {', '.join(WEIGHT_FILES)}: nothing to push")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the login cache, never from us
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        resolved = getattr(url, "repo_id", None) or repo_id  # 'name' resolves to 'user/name'
        summary = summarize_run(output_dir)
        api.upload_folder(
            repo_id=resolved,
            folder_path=output_dir,
            allow_patterns=upload_patterns(output_dir),
            delete_patterns=STALE_PATTERNS,  # files uploaded in this commit are kept
            commit_message=f"{objective_class(summary.objective).title} {'LoRA' if summary.weights.lora else 'fine-tune'}"
                           f": {summary.rounds} rounds, {summary.samples_seen} samples",  # fmt: skip
        )
    except Exception as e:  # network, auth, quota, ...: all leave the files on disk and say how to retry
        raise HubUploadError(
            f"upload of {output_dir} to the Hub repo {repo_id!r} failed ({_reason(e)}). The weights and the model "
            f"card are on disk in {output_dir}. Retry with: {retry_command(output_dir, repo_id, private)}"
        ) from e
    return resolved


def publish(cfg: Any, summary: str, api: Any = None) -> None:
    """After the weights are saved (main process): the model card, the Hub upload if asked, and ``summary``.

    A failed upload prints the retry command and raises ``HubUploadError`` (the run exits non-zero);
    the weights and the card are on disk either way.
    """
    repo_id = default_repo_id(cfg) if cfg.push_to_hub else None  # prepare_repo has resolved it in the script
    write_model_card(cfg.output_dir, repo_id)
    where = ""
    if repo_id is not None:
        try:
            repo_id = push_to_hub(cfg.output_dir, repo_id, private=cfg.hub_private, api=api)
        except HubUploadError as e:
            print(f"error: {e}", file=sys.stderr)
            raise
        weights = saved_weights(cfg.output_dir)
        where = f"; on the Hub as {repo_id}: {load_hint(weights, repo_id)}" if weights else f"; on the Hub as {repo_id}"
    print(summary + where)
