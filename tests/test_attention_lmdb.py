"""Attention maps in BasicSR-layout LMDBs, and scripts/precompute_attention.py (yoda_plugin.attention.precompute)."""
import itertools
import json
import os
import re
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import PYTHON, assert_mentions, load_precompute_script, load_script, raw_values, run_env
from yoda_plugin.attention import build_attention_source
from yoda_plugin.apps.precompute_attention import parse_source_opts
from yoda_plugin.data.attention_lmdb import (AttentionLMDBLockedError, AttentionLMDBWriter, MissingAttentionKeyError,
                                             check_attention_meta, commit_pairs, decode_attention, encode_attention,
                                             make_attention_meta, read_attention_lmdb, read_attention_meta,
                                             read_meta_info)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'precompute_attention.py')
META_LINE = re.compile(r'^(\S+)\.png \((\d+),(\d+),1\) (\d)$')
TOL = 1.0 / 65535


@pytest.fixture(scope='module')
def script():
    """The command line (its main()), run in-process."""
    return load_precompute_script('precompute_attention')


def gaussian_meta(**extra):
    return make_attention_meta(build_attention_source('gaussian'), grid='lr', **extra)


# --------------------------------------------------------------------------- round trip and layout

def test_round_trip_and_layout(tmp_path):
    path = tmp_path / 'att.lmdb'
    rng = np.random.default_rng(0)
    maps = {
        'b_0002': rng.random((17, 23)),
        'a_0001': rng.random((8, 8)).astype(np.float32),
        'c': np.array([[0.0, 1.0], [0.5, 1.0 / 65535]]),
        'one': np.ones((1, 1)),
        'img.v2': rng.random((4, 9)),
    }
    with AttentionLMDBWriter(str(path), gaussian_meta()) as writer:
        for key, amap in maps.items():
            writer.put(key, amap)
        assert 'a_0001' in writer and 'zzz' not in writer and len(writer) == len(maps)
    assert sorted(os.listdir(path)) == ['data.mdb', 'lock.mdb', 'meta_info.txt', 'yoda_attention.json',
                                        'yoda_writer.lock']
    for key, amap in maps.items():
        back = read_attention_lmdb(str(path), key)
        assert back.dtype == np.float32 and back.shape == amap.shape
        assert np.abs(back.astype(np.float64) - amap).max() <= TOL
    exact = read_attention_lmdb(str(path), 'c')
    assert exact[0, 0] == 0.0 and exact[0, 1] == 1.0

    # values are 16-bit grayscale PNGs of round(A * 65535)
    raw = raw_values(path)
    img = cv2.imdecode(np.frombuffer(raw['b_0002'], np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint16 and img.shape == (17, 23)
    np.testing.assert_array_equal(img, np.round(maps['b_0002'] * 65535).astype(np.uint16))

    # meta_info.txt: BasicSR's exact format, sorted by key, every key
    text = (path / 'meta_info.txt').read_text()
    lines = text.splitlines()
    assert text.endswith('\n')
    assert lines == [f'{k}.png ({maps[k].shape[0]},{maps[k].shape[1]},1) 1' for k in sorted(maps)]
    assert all(META_LINE.match(line) for line in lines)
    assert [row[0] for row in read_meta_info(str(path))] == sorted(maps)

    meta = json.loads((path / 'yoda_attention.json').read_text())
    assert meta == {'format': 'yoda-attention-v1', 'encoding': 'png16',
                    'source': {'name': 'gaussian', 'sigma': 0.25}, 'grid': 'lr'}
    assert read_attention_meta(str(path)) == meta


def test_basicsr_reader_compatibility(tmp_path):
    """BasicSR's own LMDB client and meta_info parsing read what we write."""
    import yoda_plugin  # noqa: F401  (torchvision shim before basicsr)
    from basicsr.utils import FileClient
    from basicsr.data.data_util import paths_from_lmdb

    path = str(tmp_path / 'att.lmdb')
    amap = np.linspace(0, 1, 30).reshape(5, 6)
    with AttentionLMDBWriter(path, gaussian_meta(), compress_level=3) as writer:
        writer.put('k1', amap)
    assert paths_from_lmdb(path) == ['k1']
    value = FileClient('lmdb', db_paths=[path], client_keys=['att']).get('k1', 'att')
    assert np.abs(decode_attention(value, 'k1') - amap).max() <= TOL
    assert open(os.path.join(path, 'meta_info.txt')).read() == 'k1.png (5,6,1) 3\n'


def test_decode_errors_name_key():
    with pytest.raises(ValueError, match='my_key'):
        decode_attention(b'not a png at all', 'my_key')
    with pytest.raises(ValueError, match='empty_key'):
        decode_attention(b'', 'empty_key')
    ok, rgb = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='rgb_key.*single-channel'):
        decode_attention(rgb.tobytes(), 'rgb_key')
    ok, png8 = cv2.imencode('.png', np.array([[0, 255]], np.uint8))
    np.testing.assert_array_equal(decode_attention(png8.tobytes()), [[0.0, 1.0]])


@pytest.mark.parametrize('bad,why', [
    (np.array([[0.5, np.nan]]), 'NaN'),
    (np.array([[0.5, np.inf]]), 'NaN or Inf'),
    (np.array([[0.5, 1.5]]), r'\[0, 1\]'),
    (np.array([[-0.01, 0.5]]), r'\[0, 1\]'),
    (np.zeros((4, 4, 1)), '2-D'),
    (np.zeros((4, 4, 3)), '2-D'),
    (np.zeros(5), '2-D'),
    (np.zeros((0, 5)), 'empty'),
    (np.array([['a', 'b']]), 'dtype'),
    (np.zeros((2, 2), bool), 'dtype'),
])
def test_invalid_maps_raise_with_key(tmp_path, bad, why):
    with AttentionLMDBWriter(str(tmp_path / 'a.lmdb'), gaussian_meta()) as writer:
        with pytest.raises(ValueError, match=why) as err:
            writer.put('the_key_42', bad)
        assert 'the_key_42' in str(err.value)
        assert 'the_key_42' not in writer


@pytest.mark.parametrize('key', ['', 'has space', 'tab\tkey', 'x' * 600])
def test_invalid_keys(tmp_path, key):
    with AttentionLMDBWriter(str(tmp_path / 'a.lmdb'), gaussian_meta()) as writer:
        with pytest.raises(ValueError):
            writer.put(key, np.zeros((2, 2)))


def test_missing_key_and_missing_lmdb(tmp_path):
    path = str(tmp_path / 'a.lmdb')
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        writer.put('present', np.zeros((2, 2)))
    with pytest.raises(ValueError) as err:
        read_attention_lmdb(path, 'absent')
    assert 'absent' in str(err.value) and path in str(err.value)
    assert isinstance(err.value, KeyError) and isinstance(err.value, MissingAttentionKeyError)
    with pytest.raises(ValueError, match='nowhere'):
        read_attention_lmdb(str(tmp_path / 'nowhere.lmdb'), 'present')


# --------------------------------------------------------------------------- resume, metadata, locking

def test_resume_skips_and_keeps_values(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    rng = np.random.default_rng(1)
    first = {'a': rng.random((6, 7)), 'b': rng.random((3, 3))}
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        for k, v in first.items():
            writer.put(k, v)
    before = raw_values(path)
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        assert 'a' in writer and 'b' in writer and 'c' not in writer
        assert writer.keys() == ['a', 'b']
        writer.put('c', np.full((2, 5), 0.25))
    after = raw_values(path)
    assert after['a'] == before['a'] and after['b'] == before['b']
    assert sorted(after) == ['a', 'b', 'c']
    lines = open(os.path.join(path, 'meta_info.txt')).read().splitlines()
    assert lines == ['a.png (6,7,1) 1', 'b.png (3,3,1) 1', 'c.png (2,5,1) 1']


def test_interrupted_writer_keeps_committed_maps(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    with pytest.raises(RuntimeError, match='boom'):
        with AttentionLMDBWriter(path, gaussian_meta()) as writer:
            writer.put('done', np.zeros((2, 2)))
            raise RuntimeError('boom')
    assert read_attention_lmdb(path, 'done').shape == (2, 2)
    assert open(os.path.join(path, 'meta_info.txt')).read() == 'done.png (2,2,1) 1\n'
    # the lock was released: a new writer opens
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        assert 'done' in writer


def test_metadata_mismatch_on_resume(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        writer.put('a', np.zeros((2, 2)))
    other = make_attention_meta(build_attention_source('gaussian', sigma=0.3), grid='hr')
    with pytest.raises(ValueError) as err:
        AttentionLMDBWriter(path, other)
    msg = str(err.value)
    assert 'source.sigma' in msg and '0.3' in msg and '0.25' in msg
    assert 'grid' in msg and '"hr"' in msg and '"lr"' in msg
    with pytest.raises(ValueError, match='extra'):
        AttentionLMDBWriter(path, gaussian_meta(extra=1))  # a field only in the new metadata
    with pytest.raises(ValueError, match='source.name'):
        AttentionLMDBWriter(path, make_attention_meta(build_attention_source('edge'), grid='lr'))
    # failed opens released the lock and left the folder untouched
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        assert writer.keys() == ['a']
    assert read_attention_meta(path)['source'] == {'name': 'gaussian', 'sigma': 0.25}


def test_refuses_foreign_lmdb(tmp_path):
    path = str(tmp_path / 'images.lmdb')
    env = lmdb.open(path, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b'x', b'y')
    env.close()
    with pytest.raises(ValueError, match='unknown content'):
        AttentionLMDBWriter(path, gaussian_meta())
    assert sorted(os.listdir(path)) == ['data.mdb', 'lock.mdb']  # left untouched


def test_bad_meta_arguments(tmp_path):
    with pytest.raises(ValueError, match='source'):
        AttentionLMDBWriter(str(tmp_path / 'a.lmdb'), {'grid': 'lr'})
    with pytest.raises(ValueError, match='format'):
        AttentionLMDBWriter(str(tmp_path / 'b.lmdb'), {**gaussian_meta(), 'format': 'v0'})
    with pytest.raises(ValueError, match='JSON'):
        AttentionLMDBWriter(str(tmp_path / 'c.lmdb'), {**gaussian_meta(), 'obj': object()})


def test_second_writer_refused(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    first = AttentionLMDBWriter(path, gaussian_meta())
    try:
        first.put('a', np.zeros((2, 2)))
        with pytest.raises(AttentionLMDBLockedError) as err:
            AttentionLMDBWriter(path, gaussian_meta())
        assert 'another process' in str(err.value) and path in str(err.value)
        assert str(os.getpid()) in str(err.value)
        first.put('b', np.zeros((2, 2)))  # the first writer is unaffected
    finally:
        first.close()
    with AttentionLMDBWriter(path, gaussian_meta()) as second:
        assert second.keys() == ['a', 'b']
    first.close()  # idempotent


def test_read_while_writer_open(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:
        writer.put('a', np.full((2, 3), 0.5))
        # py-lmdb allows one environment per folder and process: read through the writer
        assert np.abs(read_attention_lmdb(path, 'a') - 0.5).max() <= TOL
        with pytest.raises(ValueError, match="'b'"):
            read_attention_lmdb(path, 'b')
    assert np.abs(read_attention_lmdb(path, 'a') - 0.5).max() <= TOL


def test_closed_writer_raises(tmp_path):
    writer = AttentionLMDBWriter(str(tmp_path / 'a.lmdb'), gaussian_meta())
    writer.close()
    with pytest.raises(RuntimeError, match='closed'):
        writer.put('a', np.zeros((2, 2)))


def test_map_size_grows(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    rng = np.random.default_rng(2)
    maps = {f'k{i:03d}': rng.random((64, 64)) for i in range(40)}  # incompressible: ~8 KiB each
    with AttentionLMDBWriter(path, gaussian_meta(), map_size=64 * 1024) as writer:
        for k, v in maps.items():
            writer.put(k, v)
        assert writer.map_size > 64 * 1024
    for k, v in maps.items():
        assert np.abs(read_attention_lmdb(path, k) - v).max() <= TOL
    assert len(open(os.path.join(path, 'meta_info.txt')).read().splitlines()) == 40


def test_commit_pairs_grows_a_tiny_map_in_one_transaction(tmp_path):
    """The one transaction path of the package: 400 KiB in one transaction into a 64 KiB map."""
    rng = np.random.default_rng(5)
    pairs = [(f'v{i:03d}'.encode(), rng.bytes(8 * 1024)) for i in range(50)]  # incompressible bytes
    env = lmdb.open(str(tmp_path / 'raw.lmdb'), map_size=64 * 1024)
    try:
        assert commit_pairs(env, pairs) == 50
        assert env.info()['map_size'] > 64 * 1024 + 50 * 8 * 1024
        assert commit_pairs(env, [(k, b'other') for k, _ in pairs[:5]], overwrite=False) == 0  # kept
        with env.begin() as txn:
            assert {bytes(k): bytes(v) for k, v in txn.cursor()} == dict(pairs)
    finally:
        env.close()
    # the writer's bulk path grows the same way and tracks the new size
    maps = {f'k{i:03d}': rng.random((64, 64)) for i in range(50)}  # incompressible: ~8 KiB each as PNG
    encoded = [(k.encode(), encode_attention(v, k)) for k, v in maps.items()]
    path = str(tmp_path / 'att.lmdb')
    with AttentionLMDBWriter(path, gaussian_meta(), map_size=64 * 1024) as writer:
        assert writer.put_many_encoded(encoded) == 50
        assert writer.map_size == writer.env.info()['map_size'] > 64 * 1024
        assert writer.put_many_encoded(encoded[:3], overwrite=False) == 0
    assert raw_values(path) == {k.decode(): v for k, v in encoded}
    for k, v in maps.items():
        assert np.abs(read_attention_lmdb(path, k) - v).max() <= TOL
    assert [row[0] for row in read_meta_info(path)] == sorted(maps)


def test_check_attention_meta(tmp_path):
    path = str(tmp_path / 'att.lmdb')
    meta = make_attention_meta(build_attention_source('edge'), grid='lr')
    with AttentionLMDBWriter(path, meta):
        pass
    found = check_attention_meta(path, meta)  # exact match passes
    assert found['format'] == 'yoda-attention-v1'
    check_attention_meta(path, {'grid': 'lr'})  # only the given top-level fields are checked
    expected = make_attention_meta(build_attention_source('edge', blur_sigma=0.1, close_kernel=0.02), grid='hr',
                                   scale=4)
    with pytest.raises(ValueError) as err:
        check_attention_meta(path, expected)
    msg = str(err.value)
    for field in ('source.blur_sigma', 'source.close_kernel', 'grid', 'scale'):
        assert field in msg
    assert '0.1' in msg and '0.03' in msg and '<missing>' in msg and path in msg
    # expected lists just the fields that must match, at any depth
    check_attention_meta(path, {'source': {'name': 'edge'}})
    check_attention_meta(path, {'source': {'name': 'edge', 'close_kernel': 0.05}, 'grid': 'lr'})
    with pytest.raises(ValueError) as err:
        check_attention_meta(path, {'source': {'name': 'sift', 'close_kernel': 0.02}})
    assert 'source.name' in str(err.value) and 'source.close_kernel' in str(err.value)
    assert 'grid' not in str(err.value)


def test_read_attention_meta_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        read_attention_meta(str(tmp_path / 'missing.lmdb'))
    assert 'missing.lmdb' in str(err.value)
    other = tmp_path / 'other.lmdb'
    other.mkdir()
    (other / 'yoda_attention.json').write_text(json.dumps({'format': 'something-else'}))
    with pytest.raises(ValueError, match='something-else'):
        read_attention_meta(str(other))
    (other / 'yoda_attention.json').write_text('{not json')
    with pytest.raises(ValueError, match='other.lmdb'):
        read_attention_meta(str(other))


# --------------------------------------------------------------------------- property test

@st.composite
def maybe_bad_maps(draw):
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=32))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    arr = draw(hnp.arrays(dtype, shape, elements=st.floats(0.0, 1.0, width=32)))
    spoil = draw(st.lists(st.tuples(st.integers(0, arr.size - 1),
                                    st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                              st.sampled_from([np.nan, -np.inf, np.inf, -1e-9, 1.0 + 1e-6, 2.0]))),
                          max_size=3))
    flat = arr.reshape(-1)
    for index, value in spoil:
        flat[index] = value
    if draw(st.integers(0, 9)) == 0:  # now and then the wrong number of dimensions
        arr = arr[..., None] if draw(st.booleans()) else arr.reshape(-1)
    return arr


def test_put_property_round_trip_or_value_error(tmp_path):
    path = str(tmp_path / 'prop.lmdb')
    counter = itertools.count()
    with AttentionLMDBWriter(path, gaussian_meta()) as writer:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(maybe_bad_maps())
        def check(arr):
            key = f'k{next(counter)}'
            try:
                writer.put(key, arr)
            except ValueError as err:
                assert key in str(err)
                assert key not in writer
                with np.errstate(invalid='ignore'):
                    valid = arr.ndim == 2 and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
                assert not valid, f'a valid map was refused: {err}'
                return
            assert arr.ndim == 2 and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
            env = writer.env
            with env.begin() as txn:
                back = decode_attention(bytes(txn.get(key.encode())), key)
            assert back.shape == arr.shape
            assert np.abs(back.astype(np.float64) - arr.astype(np.float64)).max() <= TOL

        check()


# --------------------------------------------------------------------------- the script

def write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = {}
    for i, ext in enumerate(['.png', '.jpg', '.bmp']):
        img = np.full((40, 48, 3), 90, np.uint8)
        cv2.rectangle(img, (8 + 4 * i, 8), (30, 28), (40, 200, 250), -1)
        img = np.clip(img.astype(int) + rng.integers(-2, 3, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f'img{i}{ext}'), img)  # written as BGR
        images[f'img{i}'] = cv2.cvtColor(cv2.imread(str(folder / f'img{i}{ext}')), cv2.COLOR_BGR2RGB)
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'sub').mkdir()
    cv2.imwrite(str(folder / 'sub' / 'nested.png'), np.zeros((8, 8, 3), np.uint8))
    return images


def test_script_folder_end_to_end(tmp_path, script, capsys):
    images = write_images(tmp_path / 'lr')
    out = str(tmp_path / 'att.lmdb')
    argv = ['--input', str(tmp_path / 'lr'), '--output', out, '--source', 'edge', '--source-opt', 'blur_sigma=0.05',
            '--no-progress']
    assert script.main(argv) == 1
    printed = capsys.readouterr().out
    assert 'corrupt' in printed and 'written 3' in printed and 'failed 1' in printed and 'skipped 0' in printed
    source = build_attention_source('edge', blur_sigma=0.05)
    for key, img in images.items():
        amap = read_attention_lmdb(out, key)
        assert np.abs(amap - source(img)).max() <= TOL  # computed on the RGB image, at its size
    lines = open(os.path.join(out, 'meta_info.txt')).read().splitlines()
    assert lines == ['img0.png (40,48,1) 1', 'img1.png (40,48,1) 1', 'img2.png (40,48,1) 1']
    meta = read_attention_meta(out)
    assert meta['source'] == source.config() and meta['grid'] == 'lr'

    # rerun: everything present is skipped, the corrupt file still fails
    assert script.main(argv) == 1
    printed = capsys.readouterr().out
    assert 'written 0' in printed and 'skipped 3' in printed and 'failed 1' in printed

    # another configuration into the same output is refused (exit 2, fields named)
    assert script.main(argv[:-2] + ['blur_sigma=0.1', '--no-progress']) == 2
    assert 'source.blur_sigma' in capsys.readouterr().err


def test_script_scale_and_clean_exit(tmp_path, script, capsys):
    write_images(tmp_path / 'lr')
    (tmp_path / 'lr' / 'corrupt.png').unlink()
    out = str(tmp_path / 'att_x2.lmdb')
    assert script.main(['--input', str(tmp_path / 'lr'), '--output', out, '--source', 'gaussian', '--scale', '2',
                        '--no-progress', '--batch-size', '2']) == 0
    assert 'failed 0' in capsys.readouterr().out
    amap = read_attention_lmdb(out, 'img1')
    assert amap.shape == (80, 96) and amap.min() >= 0 and amap.max() <= 1
    meta = read_attention_meta(out)
    assert meta['grid'] == 'scaled' and meta['scale'] == 2.0 and meta['resize'] == 'bilinear'


def test_script_basicsr_lmdb_input(tmp_path, script, capsys):
    """An image LMDB built like BasicSR's create_lmdb: PNG (BGR) values, meta_info.txt."""
    lr = tmp_path / 'lr.lmdb'
    env = lmdb.open(str(lr), map_size=1 << 24)
    rng = np.random.default_rng(4)
    rgb_images, lines = {}, []
    for key in ['0001', '0002', 'x.y']:
        rgb = np.full((24, 32, 3), 60, np.uint8)
        cv2.circle(rgb, (int(rng.integers(8, 24)), 12), 5, (255, 30, 30), -1)  # red in RGB
        rgb_images[key] = rgb
        ok, buf = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        with env.begin(write=True) as txn:
            txn.put(key.encode('ascii'), buf.tobytes())
        lines.append(f'{key}.png (24,32,3) 1\n')
    lines.append('missing.png (24,32,3) 1\n')  # listed but absent: reported as a failure
    env.close()
    (lr / 'meta_info.txt').write_text(''.join(lines))

    out = str(tmp_path / 'att.lmdb')
    code = script.main(['--input', str(lr), '--output', out, '--source', 'sift', '--size', '48', '64',
                        '--no-progress'])
    printed = capsys.readouterr().out
    assert code == 1 and 'missing' in printed and 'written 3' in printed
    source = build_attention_source('sift')
    for key, rgb in rgb_images.items():
        amap = read_attention_lmdb(out, key)
        assert amap.shape == (48, 64)
        expected = np.clip(cv2.resize(source(rgb), (64, 48), interpolation=cv2.INTER_LINEAR), 0, 1)
        assert np.abs(amap - expected).max() <= TOL
    meta = read_attention_meta(out)
    assert meta['grid'] == 'fixed' and meta['size'] == [48, 64]
    assert [r[0] for r in read_meta_info(out)] == ['0001', '0002', 'x.y']


def test_script_usage_errors(tmp_path, script, capsys):
    (tmp_path / 'lr').mkdir()
    with pytest.raises(SystemExit) as err:
        script.main(['--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'o.lmdb'), '--source', 'nope'])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        script.main(['--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'o.lmdb'), '--source', 'edge',
                     '--size', '4', '4', '--scale', '2'])
    capsys.readouterr()
    assert script.main(['--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'o.lmdb'), '--source', 'edge',
                        '--source-opt', 'bogus=1']) == 2
    assert 'bogus' in capsys.readouterr().err


def test_parse_source_opts():
    assert parse_source_opts(['sigma=0.3', 'n_features=5', 'low_threshold=none', 'flag=true', 'mode=abc']) == {
        'sigma': 0.3, 'n_features': 5, 'low_threshold': None, 'flag': True, 'mode': 'abc'}
    with pytest.raises(ValueError):
        parse_source_opts(['novalue'])


def test_source_opts_are_read_as_yaml_with_exponents_as_floats():
    from yoda_plugin.attention import parse_source_opts as shared
    assert shared is parse_source_opts  # precompute (and prepare_data) use the package's parser
    parsed = shared(['sigma=1e-1', 'a=2E+3', 'heads=[0, 2]', 'weights=/w/dino.pth', 'q="1e-1"', 'n=null', 'm=max',
                     'd=2020-01-01'])
    assert parsed == {'sigma': 0.1, 'a': 2000.0, 'heads': [0, 2], 'weights': '/w/dino.pth', 'q': '1e-1', 'n': None,
                      'm': 'max', 'd': '2020-01-01'}  # quoted: the text; YAML dates: the text
    assert isinstance(parsed['sigma'], float)
    with pytest.raises(ValueError, match='sigma'):
        shared(['sigma=0.1', 'sigma=0.2'])  # given twice


def test_both_command_lines_parse_source_opts_alike(monkeypatch):
    """scripts/precompute_attention.py and scripts/inference_yoda.py build the same source from the same flags."""
    from yoda_plugin import inference
    from yoda_plugin.attention import precompute
    built = precompute.build_source('gaussian', parse_source_opts(['sigma=1e-1']))
    assert built.sigma == 0.1
    seen = {}

    def capture(opt, device=None, name=None, params=None):
        seen.update(name=name, params=params)
        raise ValueError('stop here')  # the resolver itself is not needed

    monkeypatch.setattr(inference, 'attention_source_for', capture)
    script = load_script('inference_yoda.py')
    args = script.build_parser().parse_args(['x.png', '-o', 'out', '--opt', 'o.yml', '--source', 'gaussian',
                                             '--source-opt', 'sigma=1e-1', '--device', 'cpu'])
    with pytest.raises(ValueError, match='stop here'):
        script.build_resolver(args, {'network_g': {}})
    assert seen == {'name': 'gaussian', 'params': {'sigma': 0.1}}


@pytest.mark.slow
def test_script_as_subprocess_exit_code(tmp_path):
    write_images(tmp_path / 'lr')
    out = tmp_path / 'att.lmdb'
    proc = subprocess.run([sys.executable, SCRIPT, '--input', str(tmp_path / 'lr'), '--output', str(out), '--source',
                           'gaussian'], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert 'corrupt' in proc.stdout and 'written 3' in proc.stdout
    assert (out / 'meta_info.txt').read_text().count('\n') == 3


# -- a portable writer lock: without fcntl (as on Windows) ------------------------------------------------------------

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
    assert_mentions(proc.stdout, 'refused:', str(path), 'pid ')
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
        assert_mentions(other.stdout, 'AttentionLMDBLockedError', str(path), f'pid {holder.pid}')
    finally:
        holder.communicate('', timeout=60)
    assert holder.returncode == 0
    assert not (path / 'yoda_writer.lock').exists()


# -- the precompute script on an empty input --------------------------------------------------------------------------

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
    assert_mentions(proc.stderr, f'--input {src}', 'no images')
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before
