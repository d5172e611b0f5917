"""Test a checkpoint with BasicSR's own pipeline.

    python yoda_plugin/test.py -opt options/test_sr3_yoda.yml

Results (SR images, log, per-image metrics CSV and summary JSON) go to
``./results/<name>``.
"""
import os
import sys


def main(root_path=None):
    import yoda_plugin  # noqa: F401  (registration)
    from yoda_plugin.utils.options import close_process_group, patch_basicsr_runner
    patch_basicsr_runner()
    from basicsr.test import test_pipeline
    root = root_path or os.getcwd()
    try:
        test_pipeline(root)
    except Exception as err:  # a full disk gets one line and exit code 2; anything else its traceback
        from basicsr.utils import get_root_logger

        from yoda_plugin.utils.disk import exit_if_disk_full
        exit_if_disk_full(err, root, get_root_logger())
        raise
    # Only after success: after a failure on one rank, the others may still wait in a collective.
    close_process_group()


if __name__ == '__main__':
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, os.path.dirname(here))
    main()
