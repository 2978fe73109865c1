#!/usr/bin/env bash
# Runs the speed benchmark (experiments.benchmark) with its defaults: solver overhead per step (ours and
# diffusers'), compilations across NFE 1..100, sampling vs the digits U-Net's cost, throughput on one and on
# all devices. Sets itself up like scripts/test.sh (diffusers / torch from the 'parity' extra, if they install).
# Results go to ${WORKDIR:-workdir/benchmark}: results.json, table.txt (also printed last). Extra flags pass
# through, e.g. --parts=overhead,diffusers or --model=/tmp/digits (a training workdir).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m experiments.benchmark --workdir="${WORKDIR:-workdir/benchmark}" "$@"
