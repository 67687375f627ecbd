"""Fine-tune a flow-matching model towards a reward (ORW-CFM-W2, Flow-GRPO or DiffusionNFT: ``objective``).

    accelerate launch [--config_file accelerate_configs/X.yaml] -m orw_diffusers.train --config run.yaml [--key value ...]
    orw-diffusers train --config run.yaml [--key value ...]                      # one process
    accelerate launch train_scripts/train_orw_cfm_w2.py --config run.yaml       # the same, from a checkout

Every key of the run config (see docs/configuration.md) can be overridden on the command line, as in diffusers'
scripts: ``--gradient_checkpointing`` (or ``--no_gradient_checkpointing``), ``--validation_prompts "a" "b"``.
With no ``mixed_precision`` in the run config, Accelerate's applies (``accelerate launch --mixed_precision bf16``).
Bad values exit with code 2 and one line naming the key, before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import sys

from orw_diffusers.config import parse_args, validate
from orw_diffusers.errors import ConfigError
from orw_diffusers.hub import prepare_repo


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        cfg = parse_args(argv)
        sizes = validate(cfg, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
        prepare_repo(cfg, main_process=os.environ.get("RANK", "0") == "0")  # push_to_hub: token + repo, now
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("orw_diffusers").info("derived sizes: %s", sizes.describe())

    from orw_diffusers.hub import UPLOAD_FAILED_EXIT_CODE, HubUploadError
    from orw_diffusers.trainer import Trainer  # heavy imports only once the config is valid

    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except HubUploadError:
        return UPLOAD_FAILED_EXIT_CODE  # the weights are on disk; the retry command was printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
