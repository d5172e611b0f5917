#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install the plugin with its test and app extras.
# Sourced by scripts/demo.sh and scripts/run_tests.sh; safe to run again (it reinstalls only when
# setup.py changed). Override the interpreter with PYTHON=..., the torch pin with TORCH_SPEC=...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${YODA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# torch/torchvision that import together (basicsr needs torchvision); this pair is what the
# project is tested with. Any torch>=2.1 with its matching torchvision works.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.yoda_installed"
WANT="$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing $TORCH_SPEC and the plugin (pip install -e .[test,app]) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,app]"
  # First import writes yapf's grammar cache (via mmengine); do it once here, not in two torchrun ranks at once
  # (a rank reading the other's half-written cache fails with "EOFError: Ran out of input").
  "$VENV/bin/python" -c "import mmengine.dist" >/dev/null
  echo "$WANT" > "$STAMP"
else
  echo "[setup] reusing $VENV"
fi
export PATH="$VENV/bin:$PATH"
