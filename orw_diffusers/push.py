"""Upload a finished run to the Hub (or retry a failed upload).

    orw-diffusers push OUTPUT_DIR [--hub_model_id your-name/my-lora] [--private] [--keep_card]
    python -m orw_diffusers.push ...   (the same)

Rewrites ``OUTPUT_DIR/README.md`` (the model card) so its snippet loads the given repo, unless
``--keep_card``; then ``create_repo(exist_ok=True)`` and ``upload_folder`` of the weights, card, config,
metrics and the card's images, deleting the sample images of an earlier push. ``--hub_model_id``
defaults to the run's own (in its config.yaml), else the basename of OUTPUT_DIR. The token comes from
``HF_TOKEN`` or ``hf auth login``.
Exit status: 0 uploaded, 2 bad arguments, 3 the upload failed (files untouched; the message says how to retry).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .card import CARD_NAME, load_hint, saved_weights, write_model_card
from .hub import UPLOAD_FAILED_EXIT_CODE, HubUploadError, check_repo_id, push_to_hub
from .weight_files import WEIGHT_FILES


def configured_repo_id(output_dir: str) -> str:
    """The run's own ``hub_model_id`` (in its ``config.yaml``), else the basename of ``output_dir``."""
    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            configured = (yaml.safe_load(f) or {}).get("hub_model_id")
    except (OSError, yaml.YAMLError, AttributeError):
        configured = None
    return configured if isinstance(configured, str) and configured else os.path.basename(
        os.path.normpath(os.path.abspath(output_dir))
    )


def main(argv: Optional[list[str]] = None, api: Any = None) -> int:
    """``api``: an ``HfApi``-like object (tests inject a fake); default ``huggingface_hub.HfApi()``."""
    parser = argparse.ArgumentParser(prog="orw-diffusers push", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the output_dir of a training run")
    parser.add_argument(
        "--hub_model_id", default=None,
        help="'name' (your namespace) or 'namespace/name' (default: the run's, else OUTPUT_DIR's name)",
    )  # fmt: skip
    parser.add_argument("--private", action="store_true", help="create the repo as private if it does not exist")
    parser.add_argument("--keep_card", action="store_true", help=f"upload the existing {CARD_NAME} unchanged")
    args = parser.parse_args(argv)

    weights = saved_weights(args.output_dir)
    if weights is None:
        print(f"error: {args.output_dir!r} holds none of {', '.join(WEIGHT_FILES)}: not a finished training run",
              file=sys.stderr)  # fmt: skip
        return 2
    repo_id = args.hub_model_id or configured_repo_id(args.output_dir)
    try:
        check_repo_id(repo_id, key="--hub_model_id")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if not (args.keep_card and os.path.isfile(os.path.join(args.output_dir, CARD_NAME))):
            write_model_card(args.output_dir, repo_id)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        repo_id = push_to_hub(args.output_dir, repo_id, private=args.private, api=api)
    except HubUploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return UPLOAD_FAILED_EXIT_CODE
    print(
        f"pushed {args.output_dir} to https://huggingface.co/{repo_id}  (load with {load_hint(weights, repo_id)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
