#!/usr/bin/env bash
# The test suite: offline, CPU only, about 3 minutes on 2 cores. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${ORW_VENV:-.venv}/bin/python" -m pytest -q "$@"
