"""Our train/test runners: BasicSR's own pipelines with the patches of :mod:`yoda_plugin.runner.patches`.

Command line: BasicSR's (``-opt``, ``--auto_resume``, ``--launcher``, ``--force_yml``, ``--debug``), plus for
training ``--force``: when ``--auto_resume`` (or ``path.resume_state``) would continue an experiment trained with
other settings, archive its folder and start afresh instead of refusing (:mod:`yoda_plugin.runner.settings`).
"""
import sys

from .patches import RUNNER_FLAGS, patch_basicsr_runner

OUR_FLAGS = {'train': ('--force',), 'test': ()}


def take_our_flags(phase: str, argv: list) -> dict:
    """Remove our own flags from ``argv`` (in place; BasicSR's parser refuses unknown ones); ``{'force': bool}``."""
    flags = {'force': False}
    for flag in OUR_FLAGS.get(phase, ()):
        while flag in argv[1:]:
            argv.remove(flag)
            flags[flag.lstrip('-')] = True
    return flags


def run_basicsr_pipeline(phase: str, root_path: str):
    """BasicSR's ``train_pipeline`` / ``test_pipeline`` (``phase`` 'train' or 'test') with our runner fixes.

    A full disk ends with one line and exit code 2 (:mod:`yoda_plugin.utils.disk`); other failures keep their
    traceback. The process group is closed only after success: after a failure on one rank, the others may
    still wait in a collective.
    """
    if phase not in OUR_FLAGS:
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
    RUNNER_FLAGS.update(take_our_flags(phase, sys.argv))
    patch_basicsr_runner()
    if phase == 'train':
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline
    try:
        pipeline(root_path)
    except Exception as err:
        from basicsr.utils import get_root_logger

        from yoda_plugin.utils.disk import exit_if_disk_full
        exit_if_disk_full(err, root_path, get_root_logger())
        raise
    from .dist import close_process_group
    close_process_group()
