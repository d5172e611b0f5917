#!/usr/bin/env bash
# The main job on embedded demo data: set up .venv if needed, then build the demo dataset,
# train a tiny SR3 + YODA on CPU, validate and test it. Extra arguments go to
# `python -m yoda_plugin demo` (e.g. --iters 200, --root DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m yoda_plugin demo "$@"
