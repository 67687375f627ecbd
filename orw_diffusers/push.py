"""Upload a finished run to the Hub (or retry a failed upload).

    python -m orw_diffusers.push OUTPUT_DIR --hub_model_id your-name/my-lora [--private] [--keep_card]

Rewrites ``OUTPUT_DIR/README.md`` (the model card) so its snippet loads the given repo, unless
``--keep_card``; then ``create_repo(exist_ok=True)`` and ``upload_folder`` of the weights, card, config,
metrics and the card's sample grid. The token comes from ``HF_TOKEN`` or ``huggingface-cli login``.
Exit status: 0 uploaded, 2 bad arguments, 3 the upload failed (files untouched; the message says how to retry).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from .hub import CARD_NAME, LORA_WEIGHTS_NAME, UPLOAD_FAILED_EXIT_CODE, HubUploadError, push_to_hub, write_model_card


def main(argv: Optional[list[str]] = None, api: Any = None) -> int:
    """``api``: an ``HfApi``-like object (tests inject a fake); default ``huggingface_hub.HfApi()``."""
    from .config import HUB_REPO_PATTERN

    parser = argparse.ArgumentParser(prog="python -m orw_diffusers.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the output_dir of a training run")
    parser.add_argument("--hub_model_id", required=True, help="'name' (your namespace) or 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repo as private if it does not exist")
    parser.add_argument("--keep_card", action="store_true", help=f"upload the existing {CARD_NAME} unchanged")
    args = parser.parse_args(argv)

    if not os.path.isfile(os.path.join(args.output_dir, LORA_WEIGHTS_NAME)):
        print(f"error: {args.output_dir!r} has no {LORA_WEIGHTS_NAME}: not a finished training run", file=sys.stderr)
        return 2
    if not HUB_REPO_PATTERN.match(args.hub_model_id):
        print(f"error: --hub_model_id {args.hub_model_id!r} is not like 'name' or 'namespace/name'", file=sys.stderr)
        return 2
    try:
        if not (args.keep_card and os.path.isfile(os.path.join(args.output_dir, CARD_NAME))):
            write_model_card(args.output_dir, args.hub_model_id)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        repo_id = push_to_hub(args.output_dir, args.hub_model_id, private=args.private, api=api)
    except HubUploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return UPLOAD_FAILED_EXIT_CODE
    print(
        f"pushed {args.output_dir} to https://huggingface.co/{repo_id}  (load with pipe.load_lora_weights({repo_id!r}))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
