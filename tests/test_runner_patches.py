"""Every in-memory patch of BasicSR (yoda_plugin/runner/patches.py), tested against the installed BasicSR: it is a
version the patches target, what they replace or wrap still has the shape they assume, and they do what they say
(idempotently)."""
import inspect
import os
import sys

import pytest

import yoda_plugin  # noqa: F401  (installs the import-time patches)
from yoda_plugin.runner import patches


def test_installed_basicsr_is_a_version_every_patch_targets():
    import basicsr
    for func, versions, what in patches.PATCHES:
        assert basicsr.__version__ in versions, (f'{func.__name__} ({what}) targets basicsr {versions}, installed is '
                                                 f'{basicsr.__version__}: review the patch and extend its versions')


def _parameters(func):
    return list(inspect.signature(inspect.unwrap(func)).parameters)


def test_what_the_patches_replace_has_the_assumed_signatures():
    import basicsr.data
    import basicsr.test
    import basicsr.train
    import basicsr.utils.misc
    import basicsr.utils.options
    from basicsr.data.data_sampler import EnlargedSampler
    assert _parameters(basicsr.utils.options.parse_options) == ['root_path', 'is_train']
    assert _parameters(basicsr.utils.options.copy_opt_file) == ['opt_file', 'experiments_root']
    assert _parameters(basicsr.utils.options.ordered_yaml) == []
    assert _parameters(basicsr.data.build_dataloader) == ['dataset', 'dataset_opt', 'num_gpu', 'dist', 'sampler',
                                                           'seed']
    assert _parameters(EnlargedSampler.__init__) == ['self', 'dataset', 'num_replicas', 'rank', 'ratio']
    assert _parameters(basicsr.utils.misc.make_exp_dirs) == ['opt']
    for name in ('load_resume_state', 'get_root_logger', 'copy_opt_file', 'parse_options', 'EnlargedSampler',
                 'build_dataloader', 'train_pipeline'):
        assert hasattr(basicsr.train, name), name  # module globals the patches replace, looked up at call time
    assert hasattr(basicsr.test, 'parse_options') and hasattr(basicsr.utils.options, 'init_dist')


def test_torchvision_alias_lets_basicsr_import_its_degradations():
    import torchvision.transforms.functional as functional

    import basicsr.data.degradations  # noqa: F401  (basicsr 1.4.2 from PyPI imports functional_tensor here)
    assert patches.install_torchvision_shim() is False  # in place already: idempotent
    legacy = sys.modules['torchvision.transforms.functional_tensor']
    assert legacy.rgb_to_grayscale is functional.rgb_to_grayscale


def test_make_exp_dirs_skips_path_switches(tmp_path):
    from basicsr.utils.misc import make_exp_dirs
    assert patches.install_make_exp_dirs_fix() is False  # installed by import yoda_plugin
    root = tmp_path / 'exp'
    make_exp_dirs({'is_train': True, 'path': {'experiments_root': str(root), 'models': str(root / 'models'),
                                              'trust_checkpoint': True, 'resume_state': None}})
    assert os.listdir(root) == ['models']


def test_basicsr_own_runner_resumes_on_any_device(monkeypatch):
    import basicsr.train
    import basicsr.utils.options
    for name in ('load_resume_state', 'get_root_logger'):
        monkeypatch.setattr(basicsr.train, name, getattr(basicsr.train, name))  # restored after the test

    from yoda_plugin.runner.dist import init_dist_any_device
    from yoda_plugin.runner.resume import load_resume_state_any_device
    patches.install_basicsr_runner_fixes()
    assert basicsr.utils.options.init_dist is init_dist_any_device
    assert basicsr.train.load_resume_state is load_resume_state_any_device
    assert basicsr.train.get_root_logger._yoda_flushes
    assert patches.install_basicsr_runner_fixes() == []  # idempotent


def test_our_runner_patches_are_installed_once(monkeypatch):
    import collections

    import basicsr.test as btest
    import basicsr.train as btrain
    import basicsr.utils.options as bopt
    import torch
    from basicsr.data.data_sampler import EnlargedSampler

    from yoda_plugin.utils.options import SafeOptionLoader
    for module, names in ((bopt, ('ordered_yaml', 'init_dist')), (btest, ('parse_options', )),
                          (btrain, ('parse_options', 'load_resume_state', 'get_root_logger', 'copy_opt_file',
                                    'EnlargedSampler', 'build_dataloader'))):
        for name in names:  # restored after the test
            monkeypatch.setattr(module, name, getattr(module, name))
    for _ in range(2):
        patches.patch_basicsr_runner()
    assert bopt.ordered_yaml()[0] is SafeOptionLoader
    for module in (btrain, btest):
        assert module.parse_options._yoda_checked and not hasattr(module.parse_options.__wrapped__, '_yoda_checked')
    assert btrain.copy_opt_file._yoda_records and not hasattr(btrain.copy_opt_file.__wrapped__, '_yoda_records')
    assert btrain.build_dataloader._yoda_wrapped and not hasattr(btrain.build_dataloader.__wrapped__, '_yoda_wrapped')
    assert issubclass(btrain.EnlargedSampler, EnlargedSampler) and btrain.EnlargedSampler.__base__ is EnlargedSampler
    assert collections.Counter in torch.serialization.get_safe_globals()


@pytest.mark.parametrize('phase, argv, left, force', [
    ('train', ['train', '-opt', 'x.yml', '--force', '--auto_resume'], ['train', '-opt', 'x.yml', '--auto_resume'],
     True),
    ('train', ['train', '-opt', 'x.yml'], ['train', '-opt', 'x.yml'], False),
    ('test', ['test', '-opt', 'x.yml', '--force'], ['test', '-opt', 'x.yml', '--force'], False),  # BasicSR's error
])
def test_our_flags_are_taken_before_basicsr_parses(phase, argv, left, force):
    from yoda_plugin.runner.pipeline import take_our_flags
    assert take_our_flags(phase, argv) == {'force': force} and argv == left
