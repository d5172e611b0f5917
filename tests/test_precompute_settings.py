"""scripts/precompute_attention.py on an output made with other settings: refused before anything is written, with
one line naming the differing keys; ``--force`` archives it (with its leftover shards) and makes it afresh."""
import os

import cv2
import numpy as np
import pytest

from conftest import load_precompute_script, raw_values


def _images(folder, n=3):
    folder.mkdir()
    for i in range(n):
        img = np.full((24, 32, 3), 60, np.uint8)
        cv2.rectangle(img, (4 + 2 * i, 4), (20, 18), (200, 90, 30), -1)
        cv2.imwrite(str(folder / f'img{i}.png'), img)
    return folder


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_other_source_options_are_refused_then_forced(tmp_path, capsys):
    script = load_precompute_script('precompute_settings_script')
    lr = _images(tmp_path / 'lr')
    out = tmp_path / 'att.lmdb'
    base = ['--input', str(lr), '--output', str(out), '--source', 'gaussian', '--no-progress']
    assert script.main(base + ['--source-opt', 'sigma=0.2']) == 0
    before, tree = raw_values(out), _tree(tmp_path)
    capsys.readouterr()
    assert script.main(base + ['--source-opt', 'sigma=0.3']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'Traceback' not in err
    assert str(out) in err and 'source.sigma: 0.2 -> 0.3' in err and '--force' in err and '--output' in err
    assert raw_values(out) == before and _tree(tmp_path) == tree

    (tmp_path / 'att.lmdb.shards').mkdir()  # leftovers of an interrupted sharded run go with the old output
    assert script.main(base + ['--source-opt', 'sigma=0.3', '--force']) == 0
    archived = sorted(n for n in os.listdir(tmp_path) if '_archived_' in n)
    assert len(archived) == 2 and any(n.startswith('att.lmdb.shards_archived_') for n in archived), archived
    old = next(n for n in archived if n.startswith('att.lmdb_archived_'))
    assert raw_values(tmp_path / old) == before
    assert sorted(raw_values(out)) == ['img0', 'img1', 'img2'] and raw_values(out) != before
    assert not (tmp_path / 'att.lmdb.shards').exists()


@pytest.mark.slow
def test_module_command_lines_refuse_with_exit_code_2(tmp_path):
    import subprocess

    from conftest import PYTHON, run_env
    lr = _images(tmp_path / 'lr', n=1)
    out = tmp_path / 'att.lmdb'
    for command, args in (('precompute', ['--input', str(lr), '--output', str(out), '--source', 'gaussian',
                                          '--no-progress']),):
        assert subprocess.run([PYTHON, '-m', 'yoda_plugin', command, *args], env=run_env(), capture_output=True,
                              timeout=300).returncode == 0
        proc = subprocess.run([PYTHON, '-m', 'yoda_plugin', command, *args, '--source-opt', 'sigma=0.5'],
                              env=run_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        assert 'source.sigma: 0.25 -> 0.5' in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run([PYTHON, '-m', 'yoda_plugin', 'prepare', '--check', str(tmp_path / 'none.yml')],
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'none.yml' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
