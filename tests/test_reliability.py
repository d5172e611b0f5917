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
from yoda_plugin.utils.options import load_resume_state_any_device


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
    from yoda_plugin.utils import options as uopt
    uopt._PENDING_RESUME.clear()


@pytest.mark.parametrize('policy', ['raise', 'skip'])
def test_nan_loss_is_detected(tiny_data, tmp_path, policy):
    opt = tiny_options(tiny_data, name=f'nan_{policy}', total_iter=6, logger__save_checkpoint_freq=100,
                       val__val_freq=100)
    opt['train']['optim_g']['lr'] = 1e30  # explodes within a few steps
    opt['train']['nan_policy'] = policy
    path = write_options(tmp_path / 'nan.yml', opt)
    proc = subprocess.run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', path], cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    logs = '\n'.join(open(p).read() for p in glob.glob(str(tmp_path / 'experiments' / f'nan_{policy}' / '*.log')))
    if policy == 'raise':
        assert proc.returncode != 0
        assert 'non-finite training loss' in proc.stderr and 'at iteration' in proc.stderr
        assert not glob.glob(str(tmp_path / 'experiments' / 'nan_raise' / 'models' / '*.pth'))
    else:
        assert 'step skipped (train.nan_policy: skip)' in logs


def test_bad_yoda_options_are_refused(tiny_data):
    from basicsr.models import build_model
    base = tiny_options(tiny_data)
    base.update(is_train=False, dist=False, rank=0, world_size=1, num_gpu=0)
    cases = [
        ({'yoda': {'enabled': True, 'lowerbound': 0.3}}, 'yoda.lowerbound'),
        ({'yoda': {'enabled': True, 'lower_bound': 1.2}}, 'lower_bound'),
        ({'yoda': {'enabled': True, 'lower_bound': 0}}, 'lower_bound'),
        ({'diffusion': {'num_timesteps': 100, 'sample_steps': 200}}, 'sample_steps'),
        ({'diffusion': {'schedule': 'sigmoid'}}, 'schedule'),
        ({'diffusion': {'steps': 10}}, 'diffusion.steps'),
        ({'val': {'sample_sed': 1}}, 'val.sample_sed'),
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
