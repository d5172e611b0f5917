#!/usr/bin/env bash
# Every CUDA path of the project in one run, and the GPU tables (issue 17):
#   bash scripts/gpu_check.sh                      # on a GPU machine: the full check, under 8 minutes
#   bash scripts/gpu_check.sh --device cpu --quick # the same paths at toy sizes on the CPU (what the tests run)
# Sets up .venv like the other commands, then runs yoda_plugin.gpu_check (options: --help). Prints the table
# and writes it to results/gpu_check/<UTC time>_<device>/table.md and table.json; exits 1 if any row failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m yoda_plugin.gpu_check "$@"
