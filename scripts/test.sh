#!/usr/bin/env bash
# The README's test command: install what is missing, then run the whole suite on real
# SoftHSM tokens created in a temporary directory by tests/conftest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m ruff check securethread softhsm_config tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
