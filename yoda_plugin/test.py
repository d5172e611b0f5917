"""Test a checkpoint with BasicSR's own pipeline.

    python yoda_plugin/test.py -opt options/test_sr3_yoda.yml

Results (SR images, log, per-image metrics CSV and summary JSON) go to
``./results/<name>``.
"""
import os
import sys


def main(root_path=None):
    import yoda_plugin  # noqa: F401  (registration)
    from yoda_plugin.runner.pipeline import run_basicsr_pipeline
    run_basicsr_pipeline('test', root_path or os.getcwd())


if __name__ == '__main__':
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, os.path.dirname(here))
    main()
