#!/usr/bin/env bash
# The digits demo: build (or reuse) the tiny digits SD3 base, fine-tune it towards even digits with
# ORW-CFM-W2, and print before -> after. CPU only. Extra arguments go to python -m orw_diffusers.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${ORW_VENV:-.venv}/bin/python" -m orw_diffusers.demo "$@"
