#!/usr/bin/env bash
# Create the project's virtual environment once (pinned requirements + this package, editable).
# Re-runs are no-ops unless requirements.txt or pyproject.toml changed. ORW_VENV overrides the location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ORW_VENV:-.venv}"
STAMP="$VENV/.orw-installed"
if [ ! -x "$VENV/bin/python" ] || [ requirements.txt -nt "$STAMP" ] || [ requirements-nodeps.txt -nt "$STAMP" ] \
    || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setting up $VENV (first run: a few minutes)..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import orw_diffusers, diffusers, peft, accelerate, open_clip" \
    || { echo "setup failed: see the pip output above" >&2; exit 1; }
  touch "$STAMP"
fi
