#!/usr/bin/env bash
# Every CUDA path of the project in one run, and the GPU tables:
#   bash scripts/gpu_check.sh                      # on a GPU machine: the full check, under 8 minutes
#   bash scripts/gpu_check.sh --device cpu --quick # the same paths at toy sizes on the CPU (what the tests run)
# Sets up .venv like the other commands, then runs yoda_plugin.apps.gpu_check (options: --help). Prints the table
# and writes it to results/gpu_check/<UTC time>_<device>/table.md and table.json; exits 1 if any row failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
status=0
QUICK=0; SKIP=0; PASS=()
for arg in "$@"; do
  case "$arg" in --quick) QUICK=1; PASS+=("$arg") ;; --skip-convergence) SKIP=1 ;; *) PASS+=("$arg") ;; esac
done
python -m yoda_plugin.apps.gpu_check ${PASS[@]+"${PASS[@]}"} || status=$?

# Convergence stage: vanilla SR3 and SR3 + YODA trained on the demo data at a GPU-sized batch, the learning
# curve and the final table printed (scripts/benchmark_convergence.py; docs/convergence.md). About 4 minutes on
# one GPU (a budget, not a measurement yet); --quick runs the same stage at a toy size on the CPU.
# --skip-convergence skips it.
if [ "$SKIP" = 0 ]; then
  CONV_ROOT="results/gpu_check/convergence_$(date -u +%Y%m%d_%H%M%S)"
  if [ "$QUICK" = 1 ]; then
    CONV_ARGS=(--iters 2 --eval-every 1 --seeds 0 --batch 2 --sampler ddpm:2 --jobs 2 --threads 1
               --set network_g.base_channels=8 --set network_g.norm_groups=4)
  else
    CONV_ARGS=(--iters 4000 --eval-every 500 --seeds 0 --batch 32 --sampler ddpm:20 --jobs 2 --threads 4
               --set datasets.train.num_worker_per_gpu=4)
  fi
  echo "[gpu_check] convergence stage: python scripts/benchmark_convergence.py --root $CONV_ROOT ${CONV_ARGS[*]}"
  python scripts/benchmark_convergence.py --root "$CONV_ROOT" "${CONV_ARGS[@]}" || status=$?
fi
exit $status
