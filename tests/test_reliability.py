"""Faults survived and bad inputs refused: checkpoints, resume selection, NaN losses, fuzzed masks."""
import glob
import os
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import PYTHON, run_env, tiny_options, write_options
from yoda_plugin.core import check_attention, time_dependent_mask
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
    iteration, and no checkpoint is written after the divergence (tests/test_issue16.py tests each policy)."""
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
        ({'yoda': {}}, 'yoda: the section is empty'),
        ({'yoda': {'enabled': True, 'lr_noise': 'literal'}}, 'yoda.lr_noise must be one of'),
        ({'diffusion': {'num_timesteps': 100, 'sample_steps': 200}}, 'sample_steps'),
        ({'diffusion': {'schedule': 'sigmoid'}}, 'schedule'),
        ({'diffusion': {'steps': 10}}, 'diffusion.steps'),
        ({'val': {'sample_sed': 1}}, 'val.sample_sed'),
        ({'val': {'sampler': {'type': 'ddim', 'stpes': 10}}}, 'val.sampler.stpes'),
        ({'val': {'sparse': {'margn': 3}}}, 'val.sparse.margn'),
    ]
    for change, words in cases:
        opt = {**base, **change}
        with pytest.raises(ValueError, match=words.replace('.', r'\.')):
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
    with pytest.raises(ValueError, match=r'rrdb\.pth does not fit SR3UNet.*missing key'):
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
