"""A full disk while saving a checkpoint (the checkpoint half of the full-disk handling; the LMDB half is
test_disk_full_lmdb.py): one line naming the path, exit code 2, nothing torn."""
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, run_env


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
