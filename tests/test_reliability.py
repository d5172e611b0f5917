"""Faults survived and bad inputs refused: checkpoints, resume selection, NaN losses, fuzzed masks."""
import glob
import os
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import PYTHON, assert_mentions, mentions, run_env, tiny_options, write_options
from yoda_plugin.core import check_attention, time_dependent_mask
from yoda_plugin.models.checkpoint import load_network_weights
from yoda_plugin.models.sr3_model import atomic_torch_save, load_checkpoint
from yoda_plugin.runner.resume import load_resume_state_any_device


class Custom:  # a class instance inside a checkpoint needs unsafe unpickling
    pass


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint(str(tmp_path / 'nope.pth'))
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='not a'):
        load_checkpoint(str(text))
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'params': {}, 'extra': Custom()}, unsafe)
    with pytest.raises(ValueError, match='trust_checkpoint: true'):
        load_checkpoint(str(unsafe))
    assert isinstance(load_checkpoint(str(unsafe), weights_only=False)['extra'], Custom)
    truncated = tmp_path / 'trunc.pth'
    torch.save({'params': {'w': torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match='trunc.pth'):
        load_checkpoint(str(truncated))


def test_atomic_save_leaves_previous_file_on_failure(tmp_path):
    path = str(tmp_path / 'net_g_2.pth')
    atomic_torch_save({'params': {'w': torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_torch_save({'params': Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(2))
    assert os.listdir(tmp_path) == ['net_g_2.pth'], 'no temporary file may be left behind'


def test_auto_resume_takes_newest_complete_checkpoint(tmp_path):
    exp = tmp_path / 'experiments' / 'r'
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    for it in (2, 4):
        atomic_torch_save({'epoch': 0, 'iter': it, 'optimizers': [], 'schedulers': []},
                          str(exp / 'training_states' / f'{it}.state'))
        atomic_torch_save({'params': {}}, str(exp / 'models' / f'net_g_{it}.pth'))
    # A crash while saving iteration 6: state written, weights missing; a stray temporary file.
    atomic_torch_save({'epoch': 0, 'iter': 6, 'optimizers': [], 'schedulers': []}, str(exp / 'training_states' / '6.state'))
    (exp / 'models' / 'net_g_6.pth.tmp.999').write_bytes(b'partial')
    (exp / 'training_states' / '8.state.tmp.999').write_bytes(b'partial')
    opt = {'name': 'r', 'auto_resume': True, 'path': {'training_states': str(exp / 'training_states'),
                                                      'models': str(exp / 'models')},
           'network_g': {'type': 'SR3UNet'}, 'datasets': {'train': {'batch_size_per_gpu': 2}}}
    state = load_resume_state_any_device(opt)
    assert state['iter'] == 4
    assert opt['path']['pretrain_network_g'].endswith('net_g_4.pth')
    from yoda_plugin.runner import resume as uopt
    uopt._PENDING_RESUME.clear()


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['raise', 'skip'])
def test_diverging_run_stops_without_saving_non_finite_weights(tiny_data, tmp_path, policy):
    """lr 1e30: the weights overflow within a few steps; under either policy the run stops naming the
    iteration, and no checkpoint is written after the divergence (the nan_policy tests below test each policy)."""
    opt = tiny_options(tiny_data, name=f'nan_{policy}', total_iter=6, logger__save_checkpoint_freq=1,
                       val__val_freq=100)
    opt['train']['optim_g']['lr'] = 1e30
    opt['train']['nan_policy'] = policy
    path = write_options(tmp_path / 'nan.yml', opt)
    proc = subprocess.run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', path], cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'non-finite' in proc.stderr and 'at iteration' in proc.stderr
    for ckpt in glob.glob(str(tmp_path / 'experiments' / f'nan_{policy}' / 'models' / '*.pth')):
        weights = torch.load(ckpt, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for key in ('params', 'params_ema') for v in weights[key].values()), ckpt


def test_bad_yoda_options_are_refused(tiny_data):
    from basicsr.models import build_model
    base = tiny_options(tiny_data)
    base.update(is_train=False, dist=False, rank=0, world_size=1, num_gpu=0)
    cases = [
        ({'yoda': {'enabled': True, 'lowerbound': 0.3}}, 'yoda.lowerbound'),
        ({'yoda': {'enabled': True, 'lower_bound': 1.2}}, 'lower_bound'),
        ({'yoda': {'enabled': True, 'lower_bound': 0}}, 'lower_bound'),
        ({'yoda': {}}, ('yoda:', 'yoda: {enabled: true}')),
        ({'yoda': {'enabled': True, 'lr_noise': 'literal'}}, ('yoda.lr_noise', "'literal'")),
        ({'diffusion': {'num_timesteps': 100, 'sample_steps': 200}}, 'sample_steps'),
        ({'diffusion': {'schedule': 'sigmoid'}}, 'schedule'),
        ({'diffusion': {'steps': 10}}, 'diffusion.steps'),
        ({'val': {'sample_sed': 1}}, 'val.sample_sed'),
        ({'val': {'sampler': {'type': 'ddim', 'stpes': 10}}}, 'val.sampler.stpes'),
        ({'val': {'sparse': {'margn': 3}}}, 'val.sparse.margn'),
    ]
    for change, parts in cases:
        opt = {**base, **change}
        with pytest.raises(ValueError, match=mentions(*((parts,) if isinstance(parts, str) else parts))):
            build_model(opt)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from(['float16', 'float32', 'float64', 'int32', 'uint8', 'bool']),
                  shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)),
       st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.none(), st.text(max_size=2)))
def test_fuzz_mask_inputs_fail_clearly(arr, lower_bound):
    attention = torch.from_numpy(arr.copy()) if arr.dtype.kind != 'b' else torch.from_numpy(arr.copy())
    try:
        mask = time_dependent_mask(attention, lower_bound, 3, 10)
    except (ValueError, TypeError) as err:
        assert str(err)  # a message, and one of ours
        return
    a = check_attention(attention)
    assert mask.shape == a.shape and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path):
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from basicsr.models import build_model
    other = tmp_path / 'rrdb.pth'
    torch.save({'params': RRDBNet(3, 3, num_feat=8, num_block=1, num_grow_ch=4).state_dict()}, other)
    opt = tiny_options(tiny_data)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {'pretrain_network_g': str(other), 'strict_load_g': True}
    with pytest.raises(ValueError, match=mentions('rrdb.pth', 'SR3UNet', 'missing key(s)', 'unexpected key(s)')):
        build_model(opt)


def _make_lr_folder(folder, n, size=24):
    import cv2
    import numpy as np
    from conftest import synthetic_image
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(str(folder / f'img_{i:03d}.png'), synthetic_image(rng, size)[:, :, ::-1])


@pytest.mark.slow
def test_precompute_killed_midway_then_rerun_completes(tmp_path):
    """SIGKILL the attention precompute mid-run; the rerun finishes with every key once and exact values."""
    import signal
    import time

    from yoda_plugin.data.attention_lmdb import read_attention_lmdb, read_meta_info
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                          'precompute_attention.py')
    _make_lr_folder(tmp_path / 'lr', 400)
    out, clean = tmp_path / 'att.lmdb', tmp_path / 'clean.lmdb'
    args = ['--input', str(tmp_path / 'lr'), '--source', 'sift', '--no-progress', '--commit-every', '1']
    proc = subprocess.Popen([PYTHON, script, '--output', str(out)] + args, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import lmdb

    def entries():
        if not (out / 'data.mdb').exists():
            return 0
        env = lmdb.open(str(out), readonly=True, lock=False)
        try:
            return env.stat()['entries']
        finally:
            env.close()

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and entries() < 20:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = entries()
    assert 20 <= written < 400, f'the kill must land mid-run ({written} maps written)'
    assert not (out / 'meta_info.txt').exists() or len((out / 'meta_info.txt').read_text().splitlines()) < 400
    for target in (out, clean):
        done = subprocess.run([PYTHON, script, '--output', str(target)] + args, env=run_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    keys = [k for k, _, _ in read_meta_info(str(out))]
    assert keys == sorted(set(keys)) and len(keys) == 400
    for key in keys[::37]:
        assert (read_attention_lmdb(str(out), key) == read_attention_lmdb(str(clean), key)).all()


@pytest.mark.slow
def test_second_process_writing_the_same_lmdb_is_refused(tmp_path):
    """A writer holds the folder in one process; a writer in another process is refused, nothing corrupted."""
    import numpy as np

    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta, read_attention_lmdb
    path = str(tmp_path / 'att.lmdb')
    meta = make_attention_meta({'name': 'edge'})
    with AttentionLMDBWriter(path, meta) as writer:
        writer.put('a', np.full((4, 4), 0.5, np.float32))
        code = ('import sys, numpy as np\n'
                'from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta\n'
                'try:\n'
                '    AttentionLMDBWriter(sys.argv[1], make_attention_meta({"name": "edge"}))\n'
                'except Exception as err:\n'
                '    print(type(err).__name__, err); sys.exit(3)\n')
        other = subprocess.run([PYTHON, '-c', code, path], env=run_env(), capture_output=True, text=True, timeout=60)
        assert other.returncode == 3 and 'another process' in other.stdout
        writer.put('b', np.zeros((4, 4), np.float32))
    assert float(read_attention_lmdb(path, 'a')[0, 0]) == pytest.approx(0.5, abs=1e-4)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_attention_decoding_fails_clearly(value):
    from yoda_plugin.data.attention_lmdb import decode_attention
    try:
        amap = decode_attention(value, 'fuzzed_key')
    except ValueError as err:
        assert 'fuzzed_key' in str(err)
        return
    assert amap.dtype.name == 'float32' and amap.ndim == 2


@pytest.mark.parametrize('text', ['e', 'hello world\n', 'x: 1\n'])
def test_text_file_as_a_checkpoint_is_named_without_the_unpicklers_words(tmp_path, text):
    path = tmp_path / 'notes.pth'
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert 'notes.pth' in message and 'text file' in message
    assert not any(word in message for word in ('IndexError', 'KeyError', 'pop from empty list', 'UnpicklingError'))


# -- checkpoint loading: files that are no checkpoint, unsafe pickles, a partial load ---------------------------------

@pytest.mark.parametrize('text', ['e hello world\n', 'hello: 1\nworld: [1, 2]\n', 'not a checkpoint', ''])
def test_text_file_renamed_pth_names_the_file(tmp_path, text):
    path = tmp_path / 'notes.pth'
    path.write_text(text)
    with pytest.raises(ValueError, match=mentions('notes.pth', 'checkpoint')) as info:
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
    custom = tmp_path / 'custom.pth'  # torch: "Unsupported global: GLOBAL test_reliability._Custom was not allowed"
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
    assert_mentions(w, '2 of 4', 'other.pth', "'extra.weight'", "'1.weight'", "'1.bias'")
    basicsr_log.clear()
    load_network_weights(net, _save_same(net, tmp_path), 'params', strict=False)
    assert not [line for line in basicsr_log if 'strict_load is false' in line], 'a full load says nothing'


def _save_same(net, tmp_path):
    path = str(tmp_path / 'same.pth')
    torch.save({'params': net.state_dict()}, path)
    return path


# -- the final save names the real iteration; the resolver honours trust_checkpoint -----------------------------------

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
    assert synced[1].startswith('Ranks in sync at iteration 8:') and '1 ranks' in synced[1], synced
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


# -- resuming after the optimizer type changed ------------------------------------------------------------------------

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
    assert_mentions(msg, 'train.optim_g.type', 'SGD', 'experiments/r/training_states/4.state')
    assert_mentions(msg, 'AdamW') if recorded else assert_mentions(msg, "['dampening', 'momentum', 'nesterov']")
    same = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    _resume_model(same).resume_training(state)  # the same type resumes
    assert same.state_dict()['state'][0]['step'] == 1


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
    assert_mentions(out, 'train.optim_g.type is SGD', 'AdamW', '2.state')
    assert "KeyError: 'momentum'" not in out
    now = {p: open(p, 'rb').read() for p in sorted(glob.glob(str(exp / 'models' / '*')) +
                                                   glob.glob(str(exp / 'training_states' / '*')))}
    assert now == saved, 'nothing saved is changed or added'


# -- train.nan_policy, its limit, and no checkpoint of non-finite weights ---------------------------------------------

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
    parts = ('skipped', 'train.nan_policy: skip', '2 in a row', 'stops at 3')
    assert sum(all(p in ln for p in parts) for ln in basicsr_log) == 1, basicsr_log
    model.apply_loss(_finite_loss(model), None, 3)  # a good step resets the count
    assert model.skipped_in_a_row == 0
    # A finite loss whose gradients are not (d sqrt(|x|) at 0): skipped as well, not applied.
    p = next(model.get_bare_model(model.net_g).parameters())
    bad_grad = torch.sqrt((p - p.detach()).abs().sum())
    assert torch.isfinite(bad_grad)
    after_good = _weights(model)
    model.apply_loss(bad_grad, None, 4)
    parts = ('non-finite gradients', 'loss 0', 'iteration 4', 'skipped')
    assert any(all(p in ln for p in parts) for ln in basicsr_log), basicsr_log
    assert all(torch.equal(after_good[k], v) for k, v in _weights(model).items())
    model.apply_loss(nan, None, 5)
    with pytest.raises(FloatingPointError, match=mentions('iteration 6', 'train.nan_skip_limit: 3')):
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
    with pytest.raises(FloatingPointError, match=mentions('non-finite', 'optimizer step', 'iteration 7')):
        model.apply_loss(_finite_loss(model), None, 7)  # even under nan_policy: skip
    models = model.opt['path']['models']
    with pytest.raises(FloatingPointError, match=mentions('save', 'net_g_7.pth', '1 tensor(s) of params')):
        model.save_network(model.net_g, 'net_g', 7)
    assert os.listdir(models) == [], 'nothing written, not even a temporary file'


@pytest.mark.parametrize('train, parts', [
    ({'nan_policy': 'ignore'}, ('train.nan_policy', "('raise', 'skip')", "'ignore'")),
    ({'nan_skip_limit': 0}, ('train.nan_skip_limit', 'positive integer', 'got 0')),
    ({'nan_skip_limit': 2.5}, ('train.nan_skip_limit', 'positive integer', '2.5')),
])
def test_invalid_nan_options_are_refused(tiny_data, tmp_path, train, parts):
    with pytest.raises(ValueError) as info:
        _tiny_train_model(tiny_data, tmp_path, **train)
    assert_mentions(str(info.value), *parts)


# -- --auto_resume keeps the log, falls back past unusable states, cleans temporary files -----------------------------

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
    assert_mentions(text, f'removed {stale}', 'interrupted')
    assert_mentions(text, 'skipping ' + str(exp / 'training_states' / '6.state'), 'cannot be read')
    assert 'skipping ' + str(exp / 'training_states' / '4.state') + ': ' in text and 'non-finite weights' in text
    assert_mentions(text, 'resuming from iteration 2')


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
    assert_mentions(resumed, 'auto_resume: skipping', '4.state', 'cannot be read')
    assert 'resuming from iteration 2' in resumed and 'Resuming training from epoch' in resumed
    assert 'INFO: [fallb' in resumed and 'iter:       6' in resumed.replace('iter:      6', 'iter:       6')
    assert 'auto_resume: skipping' in proc.stdout + proc.stderr  # and on the console
    assert (exp / 'models' / 'net_g_6.pth').exists()
