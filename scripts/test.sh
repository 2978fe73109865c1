#!/usr/bin/env bash
# Runs the test suite. Sets itself up: creates .venv (unless one is active or VENV names another
# folder) and installs the package with its test extras, then runs pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# pytest exits 5 when it collects no test: with `set -e` that fails the run, as it should.
# --dist loadscope keeps a module's tests on one worker, so its module-scoped fixtures (trained networks,
# statistics, searched ratios, experiment runs) are built once, not once per worker.
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadscope -m "not slow" "$@"
