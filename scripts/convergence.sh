#!/usr/bin/env bash
# Runs the main job, the solver-order convergence study, on its embedded default (the analytic
# Gaussian and GMM, every registered solver). Sets itself up like scripts/test.sh.
# Results go to ${WORKDIR:-workdir/convergence}: results.json, table.txt, convergence.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m experiments.convergence --workdir="${WORKDIR:-workdir/convergence}" "$@"
