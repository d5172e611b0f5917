#!/usr/bin/env bash
# Runs our demo option files with an *unmodified* BasicSR source checkout's own runners
# (basicsr/train.py and basicsr/test.py), and leaves the checkout as it was:
#   bash scripts/check_basicsr_checkout.sh /path/to/BasicSR [--keep] [--iters 6] [--verbose] [--workdir DIR]
# It needs nothing set up by hand and downloads nothing beyond what scripts/setup_env.sh installs:
#  - environment: the project's .venv (made by scripts/setup_env.sh if missing, as scripts/demo.sh does;
#    YODA_PYTHON=/path/to/python uses another interpreter that has the plugin's dependencies and scikit-image);
#  - a temporary work folder (removed at the end unless --keep) with a copy of the checkout's basicsr/ and
#    VERSION, the basicsr/version.py its setup.py would write, and a virtual environment of its own that
#    reuses that interpreter's packages (the copy first on PYTHONPATH; the check stops if `import basicsr`
#    is not the copy);
#  - only the demo dataset (yoda_plugin.demo.build_demo_data, 12 training and 2 validation crops), in the copy;
#  - then the copy's basicsr/train.py for 3 iterations, again with --auto_resume up to 6, and basicsr/test.py
#    with the resulting net_g_latest.pth; the runners run in the copy (relative dataroots), so experiments/,
#    tb_logger/ and results/ are written there.
# It prints each stage's time and the total (34 s on a 2-core CPU once .venv exists; making .venv
# first adds about 2 min), the test metrics, and whether the checkout is unchanged; exit code 0 when
# every stage passed, 1 otherwise (the failed stage named with its error line), 2 for a folder that is
# no BasicSR checkout.
# Details: scripts/check_basicsr_checkout.py; tested by tests/test_basicsr_checkout_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${YODA_PYTHON:-}" ]; then
  PY="$YODA_PYTHON"
else
  source "$ROOT/scripts/setup_env.sh"   # creates or reuses .venv (YODA_VENV=... for another folder)
  PY="$VENV/bin/python"
fi
exec "$PY" "$ROOT/scripts/check_basicsr_checkout.py" "$@"
