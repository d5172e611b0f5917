"""``python -m yoda_plugin.gpu_check``: kept as a name for :mod:`yoda_plugin.apps.gpu_check`, the GPU check."""
import sys

from yoda_plugin.apps.gpu_check import main

if __name__ == '__main__':
    sys.exit(main())
