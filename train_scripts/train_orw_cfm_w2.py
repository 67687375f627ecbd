"""The training entry point as a script: ``orw_diffusers.train`` (see its docstring for the options).

    accelerate launch [--config_file accelerate_configs/X.yaml] train_scripts/train_orw_cfm_w2.py \
        --config run.yaml [--key value ...]
"""

import sys

from orw_diffusers.train import main

if __name__ == "__main__":
    sys.exit(main())
