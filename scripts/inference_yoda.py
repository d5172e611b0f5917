#!/usr/bin/env python
"""Super-resolve LR images with a trained SR3 or SRDiff (+ YODA) checkpoint: an alias of ``python -m yoda_plugin sr``.

    python scripts/inference_yoda.py INPUT -o OUT_DIR --checkpoint net_g_latest.pth [--opt OPTIONS] [...]

Every flag is the ``sr`` command's (``python -m yoda_plugin sr --help``; :mod:`yoda_plugin.apps.sr`): a
checkpoint that records its options needs no ``--opt``; existing outputs are kept unless ``--overwrite``.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'analysis'))

import common  # noqa: E402,F401  (puts the repository on sys.path, imports yoda_plugin)
from yoda_plugin.apps.sr import (SetupError, build_parser, build_resolver, list_inputs,  # noqa: E402,F401
                                 non_negative_int, planned_outputs)
from yoda_plugin.apps.sr import main as _main  # noqa: E402


def main(argv=None) -> int:
    return _main(argv, prog='inference_yoda.py')


if __name__ == '__main__':
    sys.exit(main())
