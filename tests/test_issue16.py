"""Issue 16 (reliability and BasicSR fit): checkpoint loading, trust_checkpoint with BasicSR's runners,
a portable LMDB writer lock, the final save's log line, empty/odd inputs, meta_info_file."""
import logging
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, run_env
from yoda_plugin.models.checkpoint import load_checkpoint, load_network_weights


class _Capture(logging.Handler):
    """BasicSR's logger does not propagate, so pytest's caplog sees nothing of it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def basicsr_log():
    from basicsr.utils import get_root_logger
    logger = get_root_logger()
    handler, level = _Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # BasicSR sets a level only with a log file
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- item 6: checkpoint loading ---------------------------------------------------------------------------

@pytest.mark.parametrize('text', ['e hello world\n', 'hello: 1\nworld: [1, 2]\n', 'not a checkpoint', ''])
def test_text_file_renamed_pth_names_the_file(tmp_path, text):
    path = tmp_path / 'notes.pth'
    path.write_text(text)
    with pytest.raises(ValueError, match=r'notes\.pth is not a PyTorch checkpoint') as info:
        load_checkpoint(str(path))
    assert not isinstance(info.value, (IndexError, KeyError))
    assert ('text file' in str(info.value)) or ('empty' in str(info.value))


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo never-run',))


class _Custom:
    pass


def test_unsafe_globals_name_the_trust_switch_in_both_wordings(tmp_path):
    blocked = tmp_path / 'evil.pth'  # torch: "Trying to load unsupported GLOBAL posix.system ... is blocked"
    torch.save({'params': _Evil()}, blocked)
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(blocked))
    msg = str(info.value)
    assert 'evil.pth' in msg and 'trust_checkpoint: true' in msg and '--trust-checkpoint' in msg
    assert 'unsupported GLOBAL' in msg and 'system' in msg and 'malicious' in msg
    assert 'not a PyTorch checkpoint' not in msg
    custom = tmp_path / 'custom.pth'  # torch: "Unsupported global: GLOBAL test_issue16._Custom was not allowed"
    torch.save({'params': {}, 'x': _Custom()}, custom)
    with pytest.raises(ValueError, match='trust_checkpoint: true') as info:
        load_checkpoint(str(custom))
    assert 'custom.pth' in str(info.value) and 'Unsupported global' in str(info.value)


def test_non_strict_load_warns_with_dropped_keys_and_count(tmp_path, basicsr_log):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    ckpt = tmp_path / 'other.pth'
    torch.save({'params': {'0.weight': torch.ones(3, 2), '0.bias': torch.ones(3), '1.weight': torch.ones(5, 3),
                           'extra.weight': torch.ones(1)}}, ckpt)
    load_network_weights(net, str(ckpt), 'params', strict=False)
    assert torch.equal(net[0].weight, torch.ones(3, 2))
    warning = [line for line in basicsr_log if 'strict_load is false' in line]
    assert warning, basicsr_log
    w = warning[0]
    assert 'loaded 2 of 4 tensors' in w and 'other.pth' in w
    assert "'extra.weight'" in w and "'1.weight'" in w and "'1.bias'" in w
    basicsr_log.clear()
    load_network_weights(net, _save_same(net, tmp_path), 'params', strict=False)
    assert not [line for line in basicsr_log if 'strict_load is false' in line], 'a full load says nothing'


def _save_same(net, tmp_path):
    path = str(tmp_path / 'same.pth')
    torch.save({'params': net.state_dict()}, path)
    return path


# -- item 15: a portable writer lock ----------------------------------------------------------------------

_NO_FCNTL = r'''
import os, sys
sys.modules['fcntl'] = None  # as on Windows: "import fcntl" raises ImportError
import numpy as np
import yoda_plugin
assert yoda_plugin.BASICSR_IMPORT_ERROR is None, yoda_plugin.BASICSR_IMPORT_ERROR
from yoda_plugin.data.attention_lmdb import (AttentionLMDBLockedError, AttentionLMDBWriter, make_attention_meta,
                                             read_attention_lmdb)
from yoda_plugin.utils.filelock import FileLock
path, mode = sys.argv[1], sys.argv[2]
meta = make_attention_meta({'name': 'edge'})
if mode == 'hold':  # keep a writer open until stdin closes
    w = AttentionLMDBWriter(path, meta)
    print('mechanism', FileLock(path).mechanism, flush=True)
    sys.stdin.read()
    w.close()
    sys.exit(0)
if mode == 'stale':  # a dead holder's lock file is taken over
    with open(os.path.join(path, 'yoda_writer.lock'), 'w') as f:
        f.write('999999999\n')
with AttentionLMDBWriter(path, meta) as w:
    w.put('a', np.full((4, 4), 0.5, np.float32))
    try:
        AttentionLMDBWriter(path, meta)
    except AttentionLMDBLockedError as err:
        print('refused:', err)
    else:
        sys.exit('a second writer was not refused')
with AttentionLMDBWriter(path, meta) as w:  # released on close: a later writer gets it
    w.put('b', np.zeros((4, 4), np.float32))
print('read', float(read_attention_lmdb(path, 'a')[0, 0]))
'''


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['same_process', 'stale'])
def test_import_and_writer_lock_without_fcntl(tmp_path, mode):
    path = tmp_path / 'att.lmdb'
    if mode == 'stale':
        path.mkdir()
    proc = subprocess.run([PYTHON, '-c', _NO_FCNTL, str(path), mode], env=run_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'refused: another process is writing {path} (pid ' in proc.stdout
    assert 'read 0.5' in proc.stdout
    assert not (path / 'yoda_writer.lock').exists(), 'the exclusive-create lock file is removed on release'


@pytest.mark.slow
def test_writer_lock_without_fcntl_refuses_another_process(tmp_path):
    path = tmp_path / 'att.lmdb'
    holder = subprocess.Popen([PYTHON, '-c', _NO_FCNTL, str(path), 'hold'], env=run_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'mechanism exclusive-create', holder.stderr.read()
        code = ('import sys; sys.modules["fcntl"] = None\n'
                'from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta\n'
                'try:\n'
                '    AttentionLMDBWriter(sys.argv[1], make_attention_meta({"name": "edge"}))\n'
                'except Exception as err:\n'
                '    print(type(err).__name__, err); sys.exit(3)\n')
        other = subprocess.run([PYTHON, '-c', code, str(path)], env=run_env(), capture_output=True, text=True,
                               timeout=120)
        assert other.returncode == 3, other.stdout + other.stderr
        assert f'AttentionLMDBLockedError another process is writing {path} (pid {holder.pid})' in other.stdout
    finally:
        holder.communicate('', timeout=60)
    assert holder.returncode == 0
    assert not (path / 'yoda_writer.lock').exists()


# -- item 3: path.trust_checkpoint with BasicSR's own make_exp_dirs / runners -------------------------------

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


# -- item 14: the final save names the real iteration ------------------------------------------------------

def test_final_save_logs_the_last_iteration_not_minus_one(tmp_path, basicsr_log):
    import torch.distributed as dist

    from yoda_plugin.models.checkpoint import CheckpointMixin

    class _Base:
        def update_learning_rate(self, current_iter, warmup_iter=-1):
            pass

        def save(self, epoch, current_iter):
            pass

    class _Model(CheckpointMixin, _Base):
        opt = {'dist': True}
        net_g = torch.nn.Linear(2, 2)

        def get_bare_model(self, net):
            return net

    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        model = _Model()
        model.save(-1, -1)  # a run that never trained: no iteration known
        for it in range(1, 9):  # BasicSR's loop: update_learning_rate(current_iter) every iteration
            model.update_learning_rate(it, warmup_iter=-1)
        model.save(0, 8)
        model.save(-1, -1)  # BasicSR's final save after the loop
    finally:
        dist.destroy_process_group()
    synced = [line for line in basicsr_log if line.startswith('Ranks in sync')]
    assert synced[0].startswith('Ranks in sync at iteration latest (final save):')
    assert synced[1].startswith('Ranks in sync at iteration 8: identical parameter checksums on 1 ranks.')
    assert synced[2].startswith('Ranks in sync at iteration 8 (final save, latest):')
    assert not any('-1' in line for line in synced)


def test_resolver_honours_trust_checkpoint_argument_and_option(tiny_data, tmp_path):
    import fractions

    from basicsr.utils.registry import ARCH_REGISTRY
    from conftest import tiny_options
    from yoda_plugin import YODAResolver
    opt = tiny_options(tiny_data)
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    ckpt = str(tmp_path / 'pickled.pth')
    torch.save({'params_ema': net.state_dict(), 'made_with': fractions.Fraction(1, 3)}, ckpt)
    with pytest.raises(ValueError, match='trust_checkpoint: true') as info:
        YODAResolver.from_options(opt, ckpt, device='cpu')
    assert 'pickled.pth' in str(info.value) and '--trust-checkpoint' in str(info.value)
    assert YODAResolver.from_options(opt, ckpt, device='cpu', trust_checkpoint=True) is not None
    opt['path']['trust_checkpoint'] = True
    assert YODAResolver.from_options(opt, ckpt, device='cpu') is not None


# -- item 9 (parts): empty precompute input, folders named like images, optimizer type changed at resume ---------

@pytest.mark.slow
@pytest.mark.parametrize('kind', ['folder', 'folder_with_subfolder', 'lmdb'])
def test_precompute_on_empty_input_is_an_error_and_creates_nothing(tmp_path, kind):
    from conftest import PRECOMPUTE_SCRIPT
    src = tmp_path / 'in'
    src.mkdir()
    if kind == 'folder_with_subfolder':
        (src / 'sub').mkdir()
        (src / 'x.png').mkdir()  # a folder named like an image is no image
    if kind == 'lmdb':
        from yoda_plugin.data.lmdb_images import write_image_lmdb
        src = tmp_path / 'in.lmdb'
        write_image_lmdb(str(src), {})
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / 'out.lmdb'
    proc = subprocess.run([PYTHON, PRECOMPUTE_SCRIPT, '--input', str(src), '--output', str(out), '--source', 'edge'],
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f'--input {src} holds no images' in proc.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before


def test_folder_dataset_skips_folders_named_like_images(tmp_path):
    import cv2
    import numpy as np
    from basicsr.data import build_dataset
    gt, lq = tmp_path / 'gt', tmp_path / 'lq'
    for folder, size in ((gt, 32), (lq, 8)):
        folder.mkdir()
        cv2.imwrite(str(folder / 'a.png'), np.full((size, size, 3), 128, np.uint8))
        (folder / 'b.png').mkdir()  # was taken for an image and failed when read
    ds = build_dataset({'name': 't', 'type': 'YODAPairedDataset', 'phase': 'val', 'scale': 4,
                        'dataroot_gt': str(gt), 'dataroot_lq': str(lq), 'io_backend': {'type': 'disk'}})
    assert ds.keys == ['a'] and ds[0]['gt'].shape == (3, 32, 32)


class _Resumable:
    """BasicSR's resume_training: load each optimizer's state as saved."""

    def resume_training(self, resume_state):
        for o, s in zip(self.optimizers, resume_state['optimizers']):
            o.load_state_dict(s)


def _resume_model(optimizer, resume_path='experiments/r/training_states/4.state'):
    from yoda_plugin.models.checkpoint import CheckpointMixin

    class _Model(CheckpointMixin, _Resumable):
        grad_scaler = None

    model = _Model()
    model.opt = {'path': {'resume_state': resume_path}}
    model.optimizers = [optimizer]
    return model


@pytest.mark.parametrize('recorded', [True, False])
def test_resume_after_changing_the_optimizer_type_is_refused(recorded):
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.ones(3)
    adam.step()
    state = {'optimizers': [adam.state_dict()], 'schedulers': []}
    if recorded:
        state['optimizer_types'] = ['AdamW']  # what save_training_state records now
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError) as info:
        _resume_model(sgd).resume_training(state)
    msg = str(info.value)
    assert 'train.optim_g.type is SGD' in msg and 'experiments/r/training_states/4.state' in msg
    assert ('saved by AdamW' in msg) if recorded else ("lack ['dampening', 'momentum', 'nesterov']" in msg)
    same = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    _resume_model(same).resume_training(state)  # the same type resumes
    assert same.state_dict()['state'][0]['step'] == 1


# -- item 13: BasicSR's meta_info_file (a subset of an LMDB) ---------------------------------------------

def _train_opt(root, **kw):
    opt = {'name': 't', 'type': 'YODAPairedDataset', 'phase': 'val', 'scale': 4,
           'dataroot_gt': os.path.join(root, 'train_hr.lmdb'), 'dataroot_lq': os.path.join(root, 'train_lr.lmdb'),
           'dataroot_attention': os.path.join(root, 'train_att.lmdb'), 'io_backend': {'type': 'lmdb'}}
    opt.update(kw)
    return opt


def test_meta_info_file_selects_a_subset(tiny_data, tmp_path):
    from basicsr.data import build_dataset
    subset = tmp_path / 'subset.txt'
    subset.write_text('train_03.png (32,32,3) 1\n\ntrain_01.png (32,32,3) 1\n')  # BasicSR's meta_info layout
    ds = build_dataset(_train_opt(tiny_data, meta_info_file=str(subset)))
    assert ds.keys == ['train_03', 'train_01'] and len(ds) == 2
    assert ds[0]['key'] == 'train_03' and ds[1]['key'] == 'train_01'
    full = build_dataset(_train_opt(tiny_data))
    assert torch.equal(ds[1]['gt'], full[1]['gt'])
    (tmp_path / 'names.txt').write_text('train_05.png\n')  # folder-style: just file names
    assert build_dataset(_train_opt(tiny_data, meta_info_file=str(tmp_path / 'names.txt'))).keys == ['train_05']


def test_meta_info_file_errors_name_the_file_and_keys(tiny_data, tmp_path):
    from basicsr.data import build_dataset
    bad = tmp_path / 'bad.txt'
    bad.write_text('train_01.png (32,32,3) 1\nnope_7.png (32,32,3) 1\nnope_9.png\n')
    with pytest.raises(KeyError) as info:
        build_dataset(_train_opt(tiny_data, meta_info_file=str(bad)))
    msg = str(info.value)
    assert 'bad.txt' in msg and "lists 2 key(s)" in msg and "'nope_7'" in msg and "'nope_9'" in msg
    with pytest.raises(FileNotFoundError, match='meta_info_file .*absent.txt does not exist'):
        build_dataset(_train_opt(tiny_data, meta_info_file=str(tmp_path / 'absent.txt')))
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n')
    with pytest.raises(ValueError, match='empty.txt lists no keys'):
        build_dataset(_train_opt(tiny_data, meta_info_file=str(empty)))


def test_meta_info_file_needs_attention_maps_of_the_subset_only(tiny_data, tmp_path):
    import numpy as np
    from basicsr.data import build_dataset

    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
    att = str(tmp_path / 'part_att.lmdb')
    with AttentionLMDBWriter(att, make_attention_meta({'name': 'edge'}, grid='lr')) as w:
        w.put('train_02', np.full((8, 8), 0.5, np.float32))
    with pytest.raises(KeyError, match='has no map for 5 image key'):
        build_dataset(_train_opt(tiny_data, dataroot_attention=att))
    subset = tmp_path / 'subset.txt'
    subset.write_text('train_02.png (32,32,3) 1\n')
    ds = build_dataset(_train_opt(tiny_data, dataroot_attention=att, meta_info_file=str(subset)))
    assert len(ds) == 1 and float(ds[0]['attention'].mean()) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
def test_training_resumed_with_another_optimizer_type_stops_at_resume(tiny_data, tmp_path):
    import glob

    from conftest import run, tiny_options, write_options
    opt = tiny_options(tiny_data, name='optswap', total_iter=2, logger__save_checkpoint_freq=2,
                       val__val_freq=10**6, logger__use_tb_logger=False)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path], cwd=tmp_path)
    exp = tmp_path / 'experiments' / 'optswap'
    saved = {p: open(p, 'rb').read() for p in sorted(glob.glob(str(exp / 'models' / '*')) +
                                                     glob.glob(str(exp / 'training_states' / '*')))}
    assert str(exp / 'training_states' / '2.state') in saved
    opt['train']['optim_g'] = {'type': 'SGD', 'lr': 1e-3, 'momentum': 0.9}
    opt['train']['total_iter'] = 4
    write_options(opt_path, opt)
    proc = run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path, '--auto_resume'], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr  # the settings record refuses it first, before anything is written
    assert proc.returncode == 2 and 'train.optim_g.type: "AdamW" -> "SGD"' in out and 'Traceback' not in out
    os.remove(exp / 'yoda_settings.json')  # a folder from before settings records: the model's own check
    proc = run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path, '--auto_resume'], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'train.optim_g.type is SGD but the state was saved by AdamW' in out and '2.state' in out
    assert "KeyError: 'momentum'" not in out
    now = {p: open(p, 'rb').read() for p in sorted(glob.glob(str(exp / 'models' / '*')) +
                                                   glob.glob(str(exp / 'training_states' / '*')))}
    assert now == saved, 'nothing saved is changed or added'


# -- item 5: train.nan_policy, its limit, and no checkpoint of non-finite weights --------------------------

def _tiny_train_model(tiny_data, tmp_path, **train):
    from basicsr.models import build_model

    from conftest import tiny_options
    opt = tiny_options(tiny_data, name='nanunit')
    opt['train'].update(train)
    root = str(tmp_path / 'exp')
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0, root_path=root, auto_resume=False)
    opt['path'].update(experiments_root=root, models=os.path.join(root, 'models'),
                       training_states=os.path.join(root, 'training_states'), log=root,
                       visualization=os.path.join(root, 'visualization'))
    os.makedirs(opt['path']['models'])
    return build_model(opt)


def _weights(model):
    return {k: v.clone() for k, v in model.get_bare_model(model.net_g).state_dict().items()}


def _finite_loss(model):
    return sum(p.sum() for p in model.get_bare_model(model.net_g).parameters()) * 1e-6


def test_nan_skip_policy_skips_then_stops_at_its_limit(tiny_data, tmp_path, basicsr_log):
    model = _tiny_train_model(tiny_data, tmp_path, nan_policy='skip', nan_skip_limit=3)
    before = _weights(model)
    nan = torch.tensor(float('nan'))
    model.apply_loss(nan, None, 1)
    model.apply_loss(nan, None, 2)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items()), 'a skipped step changes nothing'
    assert sum('step skipped (train.nan_policy: skip; 2 in a row, the run stops at 3)' in ln for ln in basicsr_log) == 1
    model.apply_loss(_finite_loss(model), None, 3)  # a good step resets the count
    assert model.skipped_in_a_row == 0
    # A finite loss whose gradients are not (d sqrt(|x|) at 0): skipped as well, not applied.
    p = next(model.get_bare_model(model.net_g).parameters())
    bad_grad = torch.sqrt((p - p.detach()).abs().sum())
    assert torch.isfinite(bad_grad)
    after_good = _weights(model)
    model.apply_loss(bad_grad, None, 4)
    assert any('non-finite gradients (loss 0 is finite) at iteration 4: step skipped' in ln for ln in basicsr_log)
    assert all(torch.equal(after_good[k], v) for k, v in _weights(model).items())
    model.apply_loss(nan, None, 5)
    with pytest.raises(FloatingPointError, match=r'at iteration 6: 3 steps in a row skipped \(train.nan_skip_limit: 3\)'):
        model.apply_loss(nan, None, 6)


def test_non_finite_weights_stop_the_run_and_are_never_saved(tiny_data, tmp_path):
    model = _tiny_train_model(tiny_data, tmp_path, nan_policy='skip')
    p = next(model.get_bare_model(model.net_g).parameters())
    step = model.optimizer_g.step

    def poisoning_step(*args, **kwargs):  # a finite loss and gradients, and an update that overflows
        step(*args, **kwargs)
        with torch.no_grad():
            p.view(-1)[0] = float('inf')

    model.optimizer_g.step = poisoning_step
    with pytest.raises(FloatingPointError, match='weights are non-finite after the optimizer step at iteration 7'):
        model.apply_loss(_finite_loss(model), None, 7)  # even under nan_policy: skip
    models = model.opt['path']['models']
    with pytest.raises(FloatingPointError, match=r'refusing to save .*net_g_7.pth: 1 tensor\(s\) of params hold'):
        model.save_network(model.net_g, 'net_g', 7)
    assert os.listdir(models) == [], 'nothing written, not even a temporary file'


@pytest.mark.parametrize('train, words', [
    ({'nan_policy': 'ignore'}, "train.nan_policy must be one of ('raise', 'skip'), got 'ignore'"),
    ({'nan_skip_limit': 0}, 'train.nan_skip_limit must be a positive integer'),
    ({'nan_skip_limit': 2.5}, 'train.nan_skip_limit must be a positive integer'),
])
def test_invalid_nan_options_are_refused(tiny_data, tmp_path, train, words):
    with pytest.raises(ValueError) as info:
        _tiny_train_model(tiny_data, tmp_path, **train)
    assert words in str(info.value)


# -- item 4: --auto_resume keeps the log, falls back past unusable states, cleans temporary files ---------

def _dead_pid():
    proc = subprocess.Popen([PYTHON, '-c', 'pass'])
    proc.wait()
    return proc.pid


def _save_pair(exp, it, weights):
    from yoda_plugin.models.checkpoint import atomic_torch_save
    atomic_torch_save({'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []},
                      str(exp / 'training_states' / f'{it}.state'))
    atomic_torch_save({'params': weights, 'params_ema': weights}, str(exp / 'models' / f'net_g_{it}.pth'))


def test_auto_resume_skips_corrupt_and_non_finite_states_and_removes_stale_temporary_files(tmp_path, basicsr_log):
    from yoda_plugin.runner import resume as uopt
    from yoda_plugin.runner.patches import flushing_root_logger
    exp = tmp_path / 'experiments' / 'r'
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    _save_pair(exp, 2, {'w': torch.ones(2)})
    _save_pair(exp, 4, {'w': torch.tensor([1.0, float('nan')])})  # saved by an older version
    _save_pair(exp, 6, {'w': torch.ones(2)})
    (exp / 'training_states' / '6.state').write_bytes(b'PK\x03\x04 torn')  # corrupt newest state
    dead, alive = _dead_pid(), os.getpid()
    stale = exp / 'models' / f'net_g_8.pth.tmp.{dead}'
    stale.write_bytes(b'partial')
    live = exp / 'training_states' / f'8.state.tmp.{os.getppid()}'  # a running process's file is kept
    live.write_bytes(b'being written')
    opt = {'name': 'r', 'auto_resume': True, 'path': {'training_states': str(exp / 'training_states'),
                                                      'models': str(exp / 'models')},
           'network_g': {'type': 'SR3UNet'}, 'datasets': {'train': {'batch_size_per_gpu': 2}}}
    try:
        state = uopt.load_resume_state_any_device(opt)
        assert state['iter'] == 2 and opt['path']['pretrain_network_g'].endswith('net_g_2.pth')
        assert not stale.exists() and live.exists() and alive
        assert not basicsr_log, 'nothing may be logged before BasicSR has set up its log file'
        flushed = flushing_root_logger(lambda *a, **k: __import__('basicsr.utils', fromlist=['x'])
                                             .get_root_logger())
        flushed()
    finally:
        uopt._PENDING_RESUME.clear()
        uopt._DEFERRED_LOG.clear()
    text = '\n'.join(basicsr_log)
    assert f'removed {stale}: the temporary file of a save that was interrupted' in text
    assert 'skipping ' + str(exp / 'training_states' / '6.state') + ': it cannot be read' in text
    assert 'skipping ' + str(exp / 'training_states' / '4.state') + ': ' in text and 'non-finite weights' in text
    assert 'resuming from iteration 2, the newest complete checkpoint' in text


@pytest.mark.slow
def test_auto_resume_fallback_run_keeps_its_log(tiny_data, tmp_path):
    """A real run: the newest state is torn, --auto_resume falls back, and the resumed run has its train_*.log."""
    import glob

    from conftest import run, tiny_options, write_options
    opt = tiny_options(tiny_data, name='fallback', total_iter=4, logger__save_checkpoint_freq=2,
                       val__val_freq=10**6, logger__use_tb_logger=False, datasets__train__dataset_enlarge_ratio=4)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path], cwd=tmp_path)
    exp = tmp_path / 'experiments' / 'fallback'
    (exp / 'training_states' / '4.state').write_bytes(b'\x80\x02 torn by a crash')
    opt['train']['total_iter'] = 6
    write_options(opt_path, opt)
    proc = run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path, '--auto_resume'], cwd=tmp_path)
    logs = sorted(glob.glob(str(exp / 'train_fallback_*.log')))
    assert len(logs) == 2, 'the resumed run writes its own log file'
    resumed = open(logs[-1], encoding='utf-8').read()
    assert 'auto_resume: skipping' in resumed and '4.state: it cannot be read' in resumed
    assert 'resuming from iteration 2' in resumed and 'Resuming training from epoch' in resumed
    assert 'INFO: [fallb' in resumed and 'iter:       6' in resumed.replace('iter:      6', 'iter:       6')
    assert 'auto_resume: skipping' in proc.stdout + proc.stderr  # and on the console
    assert (exp / 'models' / 'net_g_6.pth').exists()


# -- item 10: BasicSR's own runner on a CPU machine: torchrun and --auto_resume ----------------------------

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


# -- item 8: a full disk during training: one line naming the path, exit code 2, nothing torn --------------

def test_atomic_save_on_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    from yoda_plugin.models import checkpoint
    from yoda_plugin.utils import disk
    path = str(tmp_path / 'net_g_2.pth')
    checkpoint.atomic_torch_save({'params': {'w': torch.ones(2)}}, path)

    def full_save(obj, f, *args, **kwargs):  # what torch says when the disk fills mid-write (measured)
        open(f, 'wb').write(b'PK partial')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')

    monkeypatch.setattr(checkpoint.torch, 'save', full_save)
    monkeypatch.setattr(disk, 'free_bytes', lambda p: 0)
    with pytest.raises(disk.DiskFullError) as info:
        checkpoint.atomic_torch_save({'params': {'w': torch.zeros(2)}}, path)
    assert str(info.value).startswith(f'no space left on {path}') and info.value.errno == 28
    assert os.listdir(tmp_path) == ['net_g_2.pth']
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(2))
    # The same words with space to spare are a bug, not a full disk: raised as they are.
    monkeypatch.setattr(disk, 'free_bytes', lambda p: 10 * 1024 ** 3)
    with pytest.raises(RuntimeError, match='unexpected pos'):
        checkpoint.atomic_torch_save({'params': {'w': torch.zeros(2)}}, path)


@pytest.mark.slow
def test_training_on_a_full_disk_exits_2_with_one_line(tiny_data, tmp_path):
    from conftest import tiny_options, write_options
    opt = tiny_options(tiny_data, name='full', total_iter=2, logger__save_checkpoint_freq=2, val__val_freq=10**6,
                       logger__use_tb_logger=False)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    # torch.save fails as on a full disk, and the file system reports no space: injected before the runner.
    code = ('import sys, torch, errno\n'
            'import yoda_plugin.utils.disk as disk\n'
            'disk.free_bytes = lambda p: 0\n'
            'def full(obj, f, *a, **k):\n'
            '    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")\n'
            'torch.save = full\n'
            'sys.argv = ["train", "-opt", sys.argv[1]]\n'
            'from yoda_plugin.train import main\n'
            'main()\n')
    proc = subprocess.run([PYTHON, '-c', code, opt_path], cwd=tmp_path, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: no space left on ') and 'net_g_2.pth' in last
    assert 'Traceback' not in proc.stderr
    assert not any(f.endswith('.pth') or '.tmp.' in f
                   for f in os.listdir(tmp_path / 'experiments' / 'full' / 'models'))


# -- item 9 (rest): inference needs no LPIPS weights and leaves no temporary folder ------------------------

@pytest.mark.slow
def test_inference_without_lpips_weights_leaves_no_temporary_folder(tiny_data, tmp_path):
    import cv2
    import numpy as np
    from basicsr.utils.registry import ARCH_REGISTRY

    from conftest import tiny_options, write_options
    opt = tiny_options(tiny_data, name='inf')
    opt['val']['metrics']['lpips'] = {'type': 'calculate_lpips', 'crop_border': 0, 'net': 'alex'}
    net_opt = dict(opt['network_g'])
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, tmp_path / 'net.pth')
    opt['path']['pretrain_network_g'] = str(tmp_path / 'net.pth')
    opt_path = write_options(tmp_path / 'inf.yml', opt)
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    temp = tmp_path / 'temp'
    temp.mkdir()
    env = dict(run_env(), TMPDIR=str(temp), YODA_LPIPS_ALEXNET=str(tmp_path / 'absent_alexnet.pth'))
    proc = subprocess.run([PYTHON, os.path.join(REPO, 'scripts', 'inference_yoda.py'), str(tmp_path / 'in'), '-o',
                           str(tmp_path / 'out'), '--opt', opt_path, '--steps', '2', '--quiet'],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path / 'out') == ['a.png']
    assert os.listdir(temp) == [], 'no temporary folder is left behind'
