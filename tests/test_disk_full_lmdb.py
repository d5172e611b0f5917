"""A full disk while writing an LMDB (the LMDB half of the full-disk handling; checkpoints are the
other, test_disk_full.py).

py-lmdb reports a full disk in its own words: ``lmdb.Error('mdb_txn_commit: Input/output error')`` on a full
tmpfs (measured on a 1 MiB tmpfs), "No space left on device" on other file systems. Every LMDB writer of the
package turns that into :class:`yoda_plugin.utils.disk.DiskFullError` naming the LMDB folder, keeps what was
committed before, and the two scripts exit 2 with one line "error: no space left on <path> ...".

No test mounts anything: :func:`install_full_disk` wraps ``lmdb.open`` so that write transactions after the
first N commits fail with py-lmdb's real error text (the failed transaction aborted, as LMDB does), and makes
the free-space probe report 0 bytes once the "disk" is full. The scripts run in a subprocess with it installed
by a ``-c`` wrapper (:func:`script_command`).
"""
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from PIL import Image

from conftest import PRECOMPUTE_SCRIPT, PYTHON, REPO, raw_values, run_env
from yoda_plugin.utils import disk
from yoda_plugin.utils.disk import DISK_FULL_EXIT_CODE, DiskFullError

TESTS = os.path.dirname(os.path.abspath(__file__))
PREPARE_SCRIPT = os.path.join(REPO, 'scripts', 'prepare_data.py')
ERROR_TEXT = {'eio': 'mdb_txn_commit: Input/output error',  # py-lmdb on a full tmpfs
              'enospc': 'mdb_txn_commit: No space left on device'}


def install_full_disk(after_commits: int, words: str = 'eio', free_when_full: int = 0):
    """Make every LMDB write transaction after the first ``after_commits`` fail as on a full disk.

    Returns ``state`` ({'commits', 'full'}) and an ``uninstall`` function. Read-only environments are real.
    """
    real_open, real_free = lmdb.open, disk.free_bytes
    state = {'commits': 0, 'full': False}
    text = ERROR_TEXT[words]

    class Txn:
        def __init__(self, txn):
            self._txn = txn

        def __getattr__(self, name):
            return getattr(self._txn, name)

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                self._txn.abort()
                return False
            self.commit()
            return False

        def commit(self):
            if state['commits'] >= after_commits:
                state['full'] = True
                self._txn.abort()  # LMDB aborts a transaction whose commit failed
                raise lmdb.Error(text)
            state['commits'] += 1
            self._txn.commit()

    class Env:
        def __init__(self, env):
            self._env = env

        def __getattr__(self, name):
            return getattr(self._env, name)

        def begin(self, *args, **kwargs):
            write = kwargs.get('write', args[1] if len(args) > 1 else False)
            txn = self._env.begin(*args, **kwargs)
            return Txn(txn) if write else txn

        def sync(self, force=False):
            if state['full']:
                raise lmdb.Error('mdb_env_sync: Input/output error')
            return self._env.sync(force)

    def fake_open(path, *args, **kwargs):
        env = real_open(path, *args, **kwargs)
        return env if kwargs.get('readonly') else Env(env)

    def fake_free(path):
        return free_when_full if state['full'] else real_free(path)

    lmdb.open, disk.free_bytes = fake_open, fake_free

    def uninstall():
        lmdb.open, disk.free_bytes = real_open, real_free
    return state, uninstall


@pytest.fixture
def full_disk():
    undo = []

    def install(*args, **kwargs):
        state, uninstall = install_full_disk(*args, **kwargs)
        undo.append(uninstall)
        return state
    yield install
    for uninstall in undo:
        uninstall()


def script_command(script, args, after_commits=None, words='eio'):
    """``python -c`` running ``script`` with ``args``, with the simulated full disk when ``after_commits``."""
    lines = ['import sys, runpy', f'sys.path.insert(0, {TESTS!r})']
    if after_commits is not None:
        lines += ['import test_disk_full_lmdb as t', f't.install_full_disk({after_commits}, {words!r})']
    lines += [f'sys.argv = [{script!r}] + {[str(a) for a in args]!r}', f'runpy.run_path({script!r}, run_name="__main__")']
    return [PYTHON, '-c', '\n'.join(lines)]


def run_script(script, args, after_commits=None, words='eio'):
    return subprocess.run(script_command(script, args, after_commits, words), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)


def _images(folder, n, size):
    from skimage import data
    os.makedirs(folder, exist_ok=True)
    photo = Image.fromarray(data.astronaut()).convert('RGB')
    for i in range(n):
        box = (8 * i, 4 * i, 8 * i + 256, 4 * i + 256)
        photo.crop(box).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f'img{i:03d}.png'))
    return folder


def _assert_one_disk_full_line(proc, path):
    assert proc.returncode == DISK_FULL_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if 'no space left on' in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f'error: no space left on {path}'), lines[0]


# --------------------------------------------------------------------------- the writers, in process

def test_commit_pairs_names_the_folder_and_keeps_earlier_commits(tmp_path, full_disk):
    from yoda_plugin.data.attention_lmdb import commit_pairs
    path = str(tmp_path / 'x.lmdb')
    full_disk(1)
    env = lmdb.open(path, map_size=1 << 20)
    try:
        assert commit_pairs(env, [(b'a', b'1')], path=path) == 1
        with pytest.raises(DiskFullError) as info:
            commit_pairs(env, [(b'b', b'2'), (b'c', b'3')], path=path)
    finally:
        env.close()
    assert str(info.value).startswith(f'no space left on {path}')
    assert 'Input/output error' in str(info.value)
    assert isinstance(info.value.__cause__, lmdb.Error)
    assert raw_values(path) == {'a': b'1'}  # the failed transaction left nothing behind


def test_an_input_output_error_with_free_space_is_not_taken_for_a_full_disk(tmp_path, full_disk):
    from yoda_plugin.data.attention_lmdb import commit_pairs
    path = str(tmp_path / 'x.lmdb')
    full_disk(0, free_when_full=10 * 1024 ** 3)
    env = lmdb.open(path, map_size=1 << 20)
    try:
        with pytest.raises(lmdb.Error) as info:
            commit_pairs(env, [(b'a', b'1')], path=path)
    finally:
        env.close()
    assert not isinstance(info.value, DiskFullError)


def test_no_space_words_need_no_probe(tmp_path, full_disk):
    from yoda_plugin.data.attention_lmdb import commit_pairs
    path = str(tmp_path / 'x.lmdb')
    full_disk(0, 'enospc', free_when_full=10 * 1024 ** 3)
    env = lmdb.open(path, map_size=1 << 20)
    try:
        with pytest.raises(DiskFullError, match='no space left on ' + str(path)):
            commit_pairs(env, [(b'a', b'1')], path=path)
    finally:
        env.close()


def test_attention_writer_close_on_a_full_disk_raises_disk_full_and_releases(tmp_path, full_disk):
    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
    path = str(tmp_path / 'att.lmdb')
    meta = make_attention_meta({'name': 'edge'})
    state = full_disk(1)
    writer = AttentionLMDBWriter(path, meta)
    writer.put('k0', np.full((4, 4), 0.5))
    with pytest.raises(DiskFullError, match=f'no space left on {path}'):
        with writer:
            writer.put('k1', np.full((4, 4), 0.25))
    assert writer.closed
    state.update(full=False, commits=-10 ** 9)  # space again
    with AttentionLMDBWriter(path, meta) as again:  # the lock was released; the committed map is there
        assert again.keys() == ['k0']


def test_image_lmdb_writer_raises_disk_full_naming_the_folder(tmp_path, full_disk):
    pytest.importorskip('basicsr')
    from yoda_plugin.data.lmdb_images import write_image_lmdb
    path = str(tmp_path / 'img.lmdb')
    full_disk(0)
    images = {f'k{i}': np.full((8, 8, 3), i, np.uint8) for i in range(3)}
    with pytest.raises(DiskFullError, match=f'no space left on {path}'):
        write_image_lmdb(path, images)


# --------------------------------------------------------------------------- the scripts, in a subprocess

@pytest.mark.slow
def test_precompute_script_exits_2_with_one_line_and_a_rerun_completes(tmp_path):
    src = _images(str(tmp_path / 'lr'), 12, 32)
    out = str(tmp_path / 'att.lmdb')
    args = ['--input', src, '--output', out, '--source', 'edge', '--commit-every', 2, '--no-progress']
    proc = run_script(PRECOMPUTE_SCRIPT, args, after_commits=3)
    _assert_one_disk_full_line(proc, out)
    before = raw_values(out)
    assert len(before) == 6  # three commits of two maps each survived

    proc = run_script(PRECOMPUTE_SCRIPT, args)  # space again
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = raw_values(out)
    assert sorted(after) == [f'img{i:03d}' for i in range(12)]
    assert all(after[k] == v for k, v in before.items())
    meta_keys = [line.split(' ')[0] for line in open(os.path.join(out, 'meta_info.txt')) if line.strip()]
    assert meta_keys == [f'img{i:03d}.png' for i in range(12)]  # every key exactly once


@pytest.mark.slow
def test_precompute_script_keeps_exit_1_for_a_failed_image(tmp_path):
    src = _images(str(tmp_path / 'lr'), 2, 32)
    with open(os.path.join(src, 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    out = str(tmp_path / 'att.lmdb')
    proc = run_script(PRECOMPUTE_SCRIPT, ['--input', src, '--output', out, '--source', 'edge', '--no-progress'])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'no space left' not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('words', ['eio', 'enospc'])
def test_prepare_script_exits_2_with_one_line_and_a_rerun_completes(tmp_path, words):
    src = _images(str(tmp_path / 'faces'), 5, 128)
    root = str(tmp_path / 'datasets')
    args = ['faces', '--input', src, '--output', root, '--scenarios', '16_128', '--workers', 1, '--commit-every', 1,
            '--no-progress']
    proc = run_script(PREPARE_SCRIPT, args, after_commits=5, words=words)  # two LMDBs: 2 commits per image
    assert proc.returncode == DISK_FULL_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if 'no space left on' in line]
    assert len(lines) == 1 and lines[0].startswith(f'error: no space left on {root}'), proc.stderr
    folders = sorted(os.path.join(root, 'FFHQ', name) for name in os.listdir(os.path.join(root, 'FFHQ'))
                     if name.endswith('.lmdb'))
    assert [os.path.basename(f) for f in folders] == ['hr_128.lmdb', 'lr_16.lmdb']
    before = {f: raw_values(f) for f in folders}
    assert sorted(len(v) for v in before.values()) == [2, 3]  # 5 commits: 3 into one LMDB, 2 into the other

    proc = run_script(PREPARE_SCRIPT, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in folders:
        after = raw_values(f)
        assert sorted(after) == [f'img{i:03d}' for i in range(5)]
        assert all(after[k] == v for k, v in before[f].items())
        meta_keys = [line.split(' ')[0] for line in open(os.path.join(f, 'meta_info.txt')) if line.strip()]
        assert meta_keys == [f'img{i:03d}.png' for i in range(5)]
    proc = run_script(PREPARE_SCRIPT, args)  # and a finished job stays finished
    assert proc.returncode == 0 and 'complete already' in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_prepare_script_disk_full_in_the_attention_stage(tmp_path):
    src = _images(str(tmp_path / 'faces'), 5, 128)
    root = str(tmp_path / 'datasets')
    args = ['faces', '--input', src, '--output', root, '--scenarios', '16_128', '--workers', 1, '--commit-every', 1,
            '--attention', 'edge', '--no-progress']
    proc = run_script(PREPARE_SCRIPT, args, after_commits=10)  # the images' 10 commits pass, the maps' fails
    _assert_one_disk_full_line(proc, os.path.join(root, 'FFHQ', 'attention_edge_16.lmdb'))
    assert len(raw_values(os.path.join(root, 'FFHQ', 'hr_128.lmdb'))) == 5

    proc = run_script(PREPARE_SCRIPT, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'FFHQ faces: complete already' in proc.stdout, proc.stdout
    assert sorted(raw_values(os.path.join(root, 'FFHQ', 'attention_edge_16.lmdb'))) == [f'img{i:03d}' for i in range(5)]
