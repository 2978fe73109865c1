#!/usr/bin/env bash
# Runs the test suite. Sets itself up: creates .venv (unless one is active or VENV names another
# folder) and installs the package with its test extras, then runs pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# pytest exits 5 when it collects no test: with `set -e` that fails the run, as it should.
exec python -m pytest -n "${PYTEST_WORKERS:-2}" -m "not slow" "$@"
