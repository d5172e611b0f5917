"""Train with BasicSR's own pipeline (Real-ESRGAN convention).

    python yoda_plugin/train.py -opt options/train_sr3_yoda.yml [--auto_resume [--force]] [--launcher pytorch]
    torchrun --nproc_per_node=N yoda_plugin/train.py -opt OPT --launcher pytorch

Experiments go to ``./experiments/<name>`` (the current directory is BasicSR's
root path). Differences from ``basicsr/train.py``: options are parsed with a
safe YAML loader and checked as a whole before anything is written,
``--launcher pytorch`` also works without GPUs (gloo), and ``--auto_resume``
refuses an experiment trained with other settings (``--force``: archive it and
start afresh); see :mod:`yoda_plugin.runner`.
"""
import os
import sys


def _fix_script_path():
    # Run as a file, Python puts yoda_plugin/ itself first on sys.path, where
    # our test.py would shadow the standard library's "test" package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, os.path.dirname(here))


def main(root_path=None):
    import yoda_plugin  # noqa: F401  (registers archs, models, datasets, losses, metrics)
    from yoda_plugin.runner.pipeline import run_basicsr_pipeline
    run_basicsr_pipeline('train', root_path or os.getcwd())


if __name__ == '__main__':
    _fix_script_path()
    main()
