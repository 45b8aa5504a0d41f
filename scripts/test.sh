#!/usr/bin/env bash
# The README's test command: install what is missing, then run the whole suite on real
# SoftHSM tokens created in a temporary directory by tests/conftest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m ruff check securethread softhsm_config tests benchmarks
# Two pytest-xdist workers (SECURETHREAD_TEST_WORKERS; 0 runs in this process), each taking
# whole modules (--dist loadfile): a module's fixtures (worlds, servers) are built once, on
# one worker; the session's demo world is built once for both (tests/integration/demo_support.py).
exec .venv/bin/python -m pytest -q -n "${SECURETHREAD_TEST_WORKERS:-2}" --dist loadfile "$@"
