#!/usr/bin/env bash
# Runs our demo option files with an *unmodified* BasicSR source checkout's own runners
# (basicsr/train.py and basicsr/test.py), the plugin installed in the active environment.
#   bash scripts/check_basicsr_checkout.sh /path/to/BasicSR
# The checkout needs basicsr/version.py, which its setup.py writes (pip install -e /path/to/BasicSR,
# or python setup.py develop). Run scripts/demo.sh once first so datasets/demo exists.
set -euo pipefail
CHECKOUT="$(cd "${1:?usage: $0 /path/to/BasicSR}" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}"
python -c "import basicsr, yoda_plugin; print('basicsr from', basicsr.__file__)"
python "$CHECKOUT/basicsr/train.py" -opt options/demo/train_sr3_yoda_demo.yml \
  --force_yml train:total_iter=6 val:val_freq=6 logger:save_checkpoint_freq=3 name=basicsr_checkout_check
python "$CHECKOUT/basicsr/test.py" -opt options/demo/test_sr3_yoda_demo.yml \
  --force_yml "path:pretrain_network_g=$CHECKOUT/experiments/basicsr_checkout_check/models/net_g_latest.pth" \
  name=basicsr_checkout_test
echo "OK: results in $CHECKOUT/experiments/basicsr_checkout_check and $CHECKOUT/results/basicsr_checkout_test"
