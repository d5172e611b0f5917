"""Every in-memory patch of BasicSR (yoda_plugin/runner/patches.py), tested against the installed BasicSR: it is a
version the patches target, what they replace or wrap still has the shape they assume, and they do what they say
(idempotently)."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON, run_env

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


_AT_EXIT = r'''
import atexit, sys
import torch.distributed as dist
from yoda_plugin.runner.dist import init_dist_any_device
# Registered before the runner's handler, so it runs after it (atexit is last in, first out).
atexit.register(lambda: print('open at exit:', dist.is_initialized(), flush=True))
init_dist_any_device('pytorch')
assert dist.is_initialized() and dist.get_backend() == 'gloo'
if sys.argv[1] == 'fail':
    raise RuntimeError('a rank fails')
'''


@pytest.mark.parametrize('ending, open_at_exit', [('success', False), ('fail', True)])
def test_process_group_is_closed_at_a_normal_exit_only(tmp_path, ending, open_at_exit):
    """BasicSR's own train.py never closes the group; left to interpreter shutdown, gloo can abort a run that
    succeeded (SIGABRT, "terminate called without an active exception"). After an uncaught exception it stays
    open: closing could wait on ranks still inside a collective."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = dict(run_env(), RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    proc = subprocess.run([PYTHON, '-c', _AT_EXIT, ending], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert f'open at exit: {open_at_exit}' in proc.stdout, proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (ending == 'success'), proc.stderr
    if ending == 'fail':
        assert 'RuntimeError: a rank fails' in proc.stderr


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


# -- path.trust_checkpoint with BasicSR's own make_exp_dirs and runners -----------------------------------------------

def _exp_opt(root, is_train=True):
    names = ('models', 'training_states', 'log', 'visualization') if is_train else ('log', 'visualization')
    path = {('experiments_root' if is_train else 'results_root'): str(root)}
    path.update({n: str(root / n) for n in names})
    path.update(trust_checkpoint=True, pretrain_network_g=None, strict_load_g=True, resume_state=None)
    return {'is_train': is_train, 'path': path}


@pytest.mark.parametrize('is_train', [True, False])
def test_basicsr_make_exp_dirs_accepts_trust_checkpoint(tmp_path, is_train):
    import basicsr.utils
    import basicsr.utils.misc
    from basicsr.utils import make_exp_dirs
    for i, func in enumerate((make_exp_dirs, basicsr.utils.make_exp_dirs, basicsr.utils.misc.make_exp_dirs)):
        opt = _exp_opt(tmp_path / f'exp{i}', is_train)
        func(opt)  # was: TypeError: expected str, bytes or os.PathLike object, not bool
        assert sorted(os.listdir(tmp_path / f'exp{i}')) == sorted(k for k in opt['path'] if k in (
            'models', 'training_states', 'log', 'visualization'))
    assert sorted(os.listdir(tmp_path)) == ['exp0', 'exp1', 'exp2'] and not os.path.exists('True')


# BasicSR imported before the plugin, as its own runners do. basicsr 1.4.2 (PyPI) needs this torchvision alias
# to import at all (a BasicSR checkout does not); installed by hand here, so that yoda_plugin is not imported.
_SHIM = r'''
import sys, types
import torchvision.transforms.functional as F
shim = types.ModuleType('torchvision.transforms.functional_tensor')
shim.rgb_to_grayscale = F.rgb_to_grayscale
sys.modules[shim.__name__] = shim
'''

_BASICSR_FIRST = _SHIM + r'''
import os, yaml
from basicsr.utils import make_exp_dirs  # bound before the option file imports the plugin, as in basicsr/train.py
from basicsr.utils.options import ordered_yaml
assert 'yoda_plugin' not in sys.modules
opt = yaml.load(open(sys.argv[1]), Loader=ordered_yaml()[0])  # BasicSR's own loader: imports yoda_plugin
opt['is_train'] = True
make_exp_dirs(opt)
print(sorted(os.listdir(opt['path']['experiments_root'])))
'''


@pytest.mark.slow
def test_trust_checkpoint_with_basicsr_imported_first(tmp_path):
    import yaml
    root = tmp_path / 'exp'
    opt = {'path': _exp_opt(root)['path']}
    opt_file = tmp_path / 'opt.yml'
    opt_file.write_text('yoda_plugin: !!python/name:yoda_plugin.__version__\n' + yaml.safe_dump(opt))
    proc = subprocess.run([PYTHON, '-c', _BASICSR_FIRST, str(opt_file)], env=run_env(), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "['log', 'models', 'training_states', 'visualization']" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ['exp', 'opt.yml']


@pytest.mark.slow
def test_basicsr_test_py_loads_trusted_checkpoint(tiny_data, tmp_path):
    """BasicSR's own test pipeline with path.trust_checkpoint: true loads a checkpoint that needs unpickling."""
    import fractions

    from basicsr.utils.registry import ARCH_REGISTRY
    from conftest import tiny_options, write_options
    opt = tiny_options(tiny_data, name='trusted')
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    ckpt = tmp_path / 'net_g_pickled.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict(), 'made_with': fractions.Fraction(1, 3)},
               ckpt)
    opt['datasets'] = {'val': opt['datasets']['val']}
    opt['val'] = {'save_img': False, 'sample_seed': 0}
    opt['path'] = {'pretrain_network_g': str(ckpt), 'param_key_g': 'params_ema', 'strict_load_g': True,
                   'trust_checkpoint': True}
    opt.pop('train')
    opt_file = write_options(tmp_path / 'test_opt.yml', opt)
    code = _SHIM + ('import os; from basicsr.test import test_pipeline\n'
                    'assert "yoda_plugin" not in sys.modules\n'
                    'test_pipeline(os.getcwd())\n')
    proc = subprocess.run([PYTHON, '-c', code, '-opt', opt_file], env=run_env(), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'Loading SR3UNet model from' in out and 'net_g_pickled.pth' in out
    assert 'TypeError' not in out


# -- BasicSR's own runner on a CPU machine: torchrun and --auto_resume ------------------------------------------------

@pytest.mark.slow
def test_basicsr_own_train_py_runs_torchrun_and_auto_resume_without_cuda(tiny_data, tmp_path):
    import glob

    import basicsr

    from conftest import run, tiny_options, write_options, train_log
    # basicsr/train.py run as a script (module __main__), as users run it; PyPI's basicsr 1.4.2 needs the
    # torchvision alias to import at all, installed by hand so that yoda_plugin is imported by the option file.
    # BasicSR's train.py puts experiments/ two folders above itself: a copy of it stands in a checkout-like
    # folder under tmp_path.
    import shutil
    checkout = tmp_path / 'BasicSR'
    (checkout / 'basicsr').mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(basicsr.__file__), 'train.py'), checkout / 'basicsr' / 'train.py')
    script = tmp_path / 'basicsr_train.py'
    script.write_text(_SHIM + 'import runpy\n'
                      f'sys.argv[0] = {str(checkout / "basicsr" / "train.py")!r}\n'
                      'assert "yoda_plugin" not in sys.modules\n'
                      'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    script = str(script)
    opt = tiny_options(tiny_data, name='own', total_iter=2, logger__save_checkpoint_freq=2, val__val_freq=10**6,
                       logger__use_tb_logger=False, datasets__train__dataset_enlarge_ratio=8)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    proc = run([PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script, '-opt',
                opt_path, '--launcher', 'pytorch'], cwd=tmp_path, timeout=400)
    out = proc.stdout + proc.stderr
    assert 'ZeroDivisionError' not in out
    exp = checkout / 'experiments' / 'own'
    assert 'World size (gpu number): 2' in train_log(exp)
    assert (exp / 'training_states' / '2.state').exists()
    opt['train']['total_iter'] = 4
    write_options(opt_path, opt)
    proc = run([PYTHON, script, '-opt', opt_path, '--auto_resume'], cwd=tmp_path)
    assert 'Found no NVIDIA driver' not in proc.stdout + proc.stderr
    logs = sorted(glob.glob(str(exp / 'train_own_*.log')))
    assert 'Resuming training from epoch' in open(logs[-1], encoding='utf-8').read()
    assert (exp / 'models' / 'net_g_4.pth').exists()
