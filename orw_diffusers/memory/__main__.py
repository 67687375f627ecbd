"""``python -m orw_diffusers.memory``: the package runs as the planner's CLI."""

import sys

from .cli import main

sys.exit(main())
