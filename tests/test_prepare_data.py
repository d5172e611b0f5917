"""scripts/prepare_data.py (yoda_plugin.data.prepare) on generated data.

scikit-image photos stand in for the datasets: resized to 1024x1024 for FFHQ / CelebA-HQ (plus one
non-square image) and to a few DIV2K-like sizes (not multiples of 4, one needing a shifted last sub-image).
DINO ResNet-50 runs with seeded random weights saved as its official file (no weights exist on the test
machines) at input_size 64 to keep the tests fast; the option files check only the source name and heads.
"""
import contextlib
import copy
import glob
import importlib.util
import io
import json
import os
import shutil

import cv2
import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import yoda_plugin  # noqa: F401
from conftest import assert_mentions
from yoda_plugin.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION_FILES = sorted(glob.glob(os.path.join(REPO, 'options', 'train_*.yml')) +
                      glob.glob(os.path.join(REPO, 'options', 'test_*.yml')))


def _load_script():
    spec = importlib.util.spec_from_file_location('prepare_data_script',
                                                  os.path.join(REPO, 'scripts', 'prepare_data.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _load_script()


def run_cli(*argv):
    """(exit status, stdout + stderr) of the script's main, in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = SCRIPT.main([str(a) for a in argv])
    return code, out.getvalue()


def _photo(name, w, h):
    from skimage import data
    return np.asarray(Image.fromarray(getattr(data, name)()).convert('RGB').resize((w, h), Image.BICUBIC))


def _save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def lmdb_items(path):
    from yoda_plugin.data.lmdb_reader import open_lmdb
    try:
        env, owned = lmdb.open(path, readonly=True, lock=False), True
    except lmdb.Error:  # held open by a dataset of an earlier test (one environment per folder and process)
        env, owned = open_lmdb(path), False
    try:
        with env.begin() as txn:
            return {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    finally:
        if owned:
            env.close()


def decode(value):
    return cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('prepare_inputs')
    faces = {'00000': _photo('astronaut', 1024, 1024), '00001': _photo('coffee', 1024, 1024),
             '00002': _photo('chelsea', 1024, 1024)}
    for key, img in faces.items():  # one in a sub-folder, as FFHQ ships
        _save(str(root / 'ffhq' / ('01000' if key == '00002' else '00000') / f'{key}.png'), img)
    celeba = {'10000': _photo('rocket', 1024, 1024), 'wide': _photo('coffee', 1100, 1024)}
    for key, img in celeba.items():
        _save(str(root / 'celeba' / f'{key}.png'), img)
    df2k = {'0001': _photo('coffee', 903, 702), '000001': _photo('astronaut', 676, 500)}
    _save(str(root / 'div2k_train' / '0001.png'), df2k['0001'])
    _save(str(root / 'flickr2k' / '000001.png'), df2k['000001'])
    val = _photo('chelsea', 510, 343)
    _save(str(root / 'div2k_val' / '0801.png'), val)
    torch.manual_seed(0)
    from yoda_plugin.attention.dino import resnet50_backbone
    weights = root / 'dino_resnet50_pretrain.pth'
    torch.save(resnet50_backbone().state_dict(), weights)
    return {'root': root, 'faces': faces, 'celeba': celeba, 'df2k': df2k, 'val': val, 'weights': str(weights)}


def dino_args(inputs):
    return ['--attention-opt', f'dino_resnet50.weights={inputs["weights"]}',
            '--attention-opt', 'dino_resnet50.input_size=64', '--device', 'cpu']


def face_command(inputs, out, *extra):
    return ['faces', '--input', inputs['root'] / 'ffhq', '--output', out, '--no-progress', *extra]


@pytest.fixture(scope='module')
def prepared(inputs, tmp_path_factory):
    """Every scenario's data under <root>/datasets, made with two workers."""
    root = tmp_path_factory.mktemp('prepared')
    out = root / 'datasets'
    logs = {}
    logs['ffhq'] = run_cli(*face_command(inputs, out, '--workers', 2, '--attention', 'dino_resnet50:max', 'edge',
                                         *dino_args(inputs)))
    logs['celeba'] = run_cli('faces', '--input', inputs['root'] / 'celeba', '--output', out, '--val', '--no-progress',
                             '--workers', 2, '--attention', 'dino_resnet50:max', *dino_args(inputs))
    logs['df2k'] = run_cli('df2k', '--train-hr', inputs['root'] / 'div2k_train', inputs['root'] / 'flickr2k',
                           '--val-hr', inputs['root'] / 'div2k_val', '--output', out, '--no-progress',
                           '--workers', 2, '--attention', 'dino_resnet50:max', *dino_args(inputs))
    for name, (code, text) in logs.items():
        assert code == 0, f'{name}:\n{text}'
    return {'root': root, 'out': out, 'logs': logs}


# --------------------------------------------------------------------------------------------------------------
# what is written
# --------------------------------------------------------------------------------------------------------------

def test_subimage_starts_hand_checked():
    # SRDiff: starts 0, 320, ... while start < length - 160; a start past length - 320 moves back inside
    assert prepare.subimage_starts(320) == [0]
    assert prepare.subimage_starts(480) == [0]          # 320 is not < 480 - 160: the last 160 pixels stay unused
    assert prepare.subimage_starts(481) == [0, 161]
    assert prepare.subimage_starts(640) == [0, 320]
    assert prepare.subimage_starts(700) == [0, 320]
    assert prepare.subimage_starts(900) == [0, 320, 580]


def test_matlab_imresize_float_path_equals_basicsr_and_uint8_path_rounds_per_pass(inputs):
    from basicsr.utils.matlab_functions import imresize as basicsr_imresize
    img = inputs['df2k']['000001'][:203, :301]  # odd sizes: ceil(203 / 4) = 51 rows
    ours = prepare.matlab_imresize(img, 0.25, quantize=False)
    ref = basicsr_imresize(img.astype(np.float64) / 255.0, 0.25).astype(np.float64) * 255.0
    assert ours.shape == ref.shape == (51, 76, 3)
    assert np.abs(ours - ref).max() < 1e-3  # BasicSR computes in float32
    lr = prepare.matlab_imresize(img, 0.25)
    once = np.round(np.clip(ours, 0, 255))
    diff = np.abs(lr.astype(int) - once)
    assert lr.dtype == np.uint8 and 0 < diff.max() <= 4 and (diff == 0).mean() > 0.8  # rounding after each pass
    flat = np.full((40, 44, 3), 77, np.uint8)
    assert np.array_equal(prepare.matlab_imresize(flat, 0.25), np.full((10, 11, 3), 77, np.uint8))
    np.testing.assert_allclose(prepare.matlab_resize_matrix(13, 0.25).sum(axis=1), 1.0, atol=1e-12)


def test_sr3_resize_equals_torchvision_resize_and_centre_crop(inputs):
    from torchvision.transforms import functional as trans_fn
    for img in (inputs['celeba']['wide'], inputs['df2k']['0001'], inputs['df2k']['0001'].swapaxes(0, 1)):
        for size in (16, 64, 128):
            pil = Image.fromarray(np.ascontiguousarray(img))
            ref = np.asarray(trans_fn.center_crop(trans_fn.resize(pil, size, Image.BICUBIC), size))
            assert np.array_equal(prepare.sr3_resize(np.ascontiguousarray(img), size), ref), (img.shape, size)


def test_faces_layout_values_and_meta_info(prepared, inputs):
    ffhq, celeba = prepared['out'] / 'FFHQ', prepared['out'] / 'CelebA-HQ'
    for folder, images in ((ffhq, inputs['faces']), (celeba, inputs['celeba'])):
        for name, size in (('lr_16', 16), ('lr_64', 64), ('hr_128', 128), ('hr_256', 256), ('hr_512', 512)):
            path = str(folder / f'{name}.lmdb')
            items = lmdb_items(path)
            assert sorted(items) == sorted(images)
            with open(os.path.join(path, 'meta_info.txt')) as f:
                assert f.read() == ''.join(f'{k}.png ({size},{size},3) 1\n' for k in sorted(images))
            for key, value in items.items():
                assert np.array_equal(decode(value), prepare.sr3_resize(images[key], size)), (path, key)
            assert os.path.isfile(os.path.join(path, prepare.COMPLETE_FILE))
        assert sorted(lmdb_items(str(folder / 'attention_dino_resnet50_max_16.lmdb'))) == sorted(images)
        assert sorted(lmdb_items(str(folder / 'attention_dino_resnet50_max_64.lmdb'))) == sorted(images)
    assert sorted(lmdb_items(str(ffhq / 'attention_edge_16.lmdb'))) == sorted(inputs['faces'])
    log = prepared['logs']['ffhq'][1]
    assert '[prepare] summary' in log and 'hr_512.lmdb' in log and '512x512' in log and 'disk used' in log


def test_df2k_subimages_and_div2k_val_as_srdiff(prepared, inputs):
    hr = lmdb_items(str(prepared['out'] / 'DF2K' / 'DF2K_HR_sub320.lmdb'))
    lr = lmdb_items(str(prepared['out'] / 'DF2K' / 'DF2K_LR_bicubic_X4_sub80.lmdb'))
    # 903x702 -> 900x700: rows [0, 320], columns [0, 320, 580]; 676x500: rows [0, 180], columns [0, 320]
    expected = {'0001': ([0, 320], [0, 320, 580]), '000001': ([0, 180], [0, 320])}
    assert sorted(hr) == sorted(lr) == sorted([f'0001_s{i:03d}' for i in range(1, 7)] +
                                              [f'000001_s{i:03d}' for i in range(1, 5)])
    for key, (rows, cols) in expected.items():
        img = inputs['df2k'][key]
        modcropped = img[:img.shape[0] // 4 * 4, :img.shape[1] // 4 * 4]
        whole_lr = prepare.matlab_imresize(modcropped, 0.25)
        index = 0
        for top in rows:
            for left in cols:
                index += 1
                sub = f'{key}_s{index:03d}'
                assert np.array_equal(decode(hr[sub]), modcropped[top:top + 320, left:left + 320]), sub
                assert np.array_equal(decode(lr[sub]), whole_lr[top // 4:top // 4 + 80, left // 4:left // 4 + 80]), sub
    val_hr = decode(lmdb_items(str(prepared['out'] / 'DIV2K' / 'DIV2K_valid_HR.lmdb'))['0801'])
    val_lr = decode(lmdb_items(str(prepared['out'] / 'DIV2K' / 'DIV2K_valid_LR_bicubic_X4.lmdb'))['0801'])
    assert np.array_equal(val_hr, inputs['val'][:340, :508])
    assert np.array_equal(val_lr, prepare.matlab_imresize(inputs['val'][:340, :508], 0.25))
    assert val_lr.shape == (85, 127, 3)
    att = lmdb_items(str(prepared['out'] / 'DF2K' / 'attention_dino_resnet50_max_sub80.lmdb'))
    assert sorted(att) == sorted(lr)


# --------------------------------------------------------------------------------------------------------------
# idempotence and resuming
# --------------------------------------------------------------------------------------------------------------

def _state(folder):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(str(folder), '*', '*'))
            if not p.endswith('.lock')}


def test_rerun_of_a_finished_job_does_nothing(prepared, inputs):
    before = _state(prepared['out'])
    code, log = run_cli(*face_command(inputs, prepared['out'], '--attention', 'dino_resnet50:max', 'edge',
                                      *dino_args(inputs)))
    assert code == 0, log
    assert log.count('nothing to do') == 5  # the image job and four attention LMDBs
    assert 'written' not in log
    assert _state(prepared['out']) == before


def test_resume_after_an_interruption_and_a_lost_marker(prepared, inputs, tmp_path, monkeypatch):
    out = tmp_path / 'datasets'
    command = face_command(inputs, out, '--scenarios', '16_128', '--workers', 1, '--commit-every', 1)
    calls = []
    real_commit = prepare.commit_pairs

    def dying_commit(env, pairs, **kw):  # the run is killed while storing the second image
        calls.append(len(pairs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_commit(env, pairs, **kw)

    monkeypatch.setattr(prepare, 'commit_pairs', dying_commit)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*command)
    monkeypatch.setattr(prepare, 'commit_pairs', real_commit)
    lr16, hr128 = str(out / 'FFHQ' / 'lr_16.lmdb'), str(out / 'FFHQ' / 'hr_128.lmdb')
    assert len(lmdb_items(lr16)) == 1 and len(lmdb_items(hr128)) == 1
    assert not os.path.exists(os.path.join(lr16, prepare.COMPLETE_FILE))
    with open(os.path.join(lr16, 'meta_info.txt')) as f:
        assert len(f.readlines()) == 1  # meta_info.txt lists what was committed
    code, log = run_cli(*command)
    assert code == 0, log
    assert_mentions(log, '2 input(s) written', '1 already present', '0 failed')
    reference = prepared['out'] / 'FFHQ'  # made in one go with two workers
    for name in ('lr_16', 'hr_128'):
        assert lmdb_items(str(out / 'FFHQ' / f'{name}.lmdb')) == lmdb_items(str(reference / f'{name}.lmdb'))
        with open(out / 'FFHQ' / f'{name}.lmdb' / 'meta_info.txt') as a, \
                open(reference / f'{name}.lmdb' / 'meta_info.txt') as b:
            assert a.read() == b.read()

    # a lost marker and a lost key: only the key is made again
    os.remove(os.path.join(hr128, prepare.COMPLETE_FILE))
    env = lmdb.open(lr16)
    with env.begin(write=True) as txn:
        txn.delete(b'00001')
    env.close()
    code, log = run_cli(*command)
    assert code == 0, log
    assert_mentions(log, '1 input(s) written', '2 already present', '0 failed')
    assert lmdb_items(lr16) == lmdb_items(str(reference / 'lr_16.lmdb'))
    assert os.path.isfile(os.path.join(hr128, prepare.COMPLETE_FILE))
    code, log = run_cli(*command)
    assert code == 0 and 'nothing to do' in log

    # more images later (--limit grows): the finished LMDBs are extended, not rebuilt
    small = tmp_path / 'limited'
    assert run_cli(*face_command(inputs, small, '--scenarios', '16_128', '--limit', 2))[0] == 0
    assert sorted(lmdb_items(str(small / 'FFHQ' / 'lr_16.lmdb'))) == ['00000', '00001']
    code, log = run_cli(*face_command(inputs, small, '--scenarios', '16_128'))
    assert code == 0
    assert_mentions(log, '1 input(s) written', '2 already present')
    # another scenario later: only its LMDBs are written
    lr16_db = small / 'FFHQ' / 'lr_16.lmdb' / 'data.mdb'
    before = os.stat(lr16_db).st_mtime_ns
    code, log = run_cli(*face_command(inputs, small, '--scenarios', '16_128', '64_256'))
    assert code == 0
    assert_mentions(log, '3 input(s) written', '0 already present')
    assert os.stat(lr16_db).st_mtime_ns == before
    assert lmdb_items(str(small / 'FFHQ' / 'hr_256.lmdb')) == lmdb_items(str(reference / 'hr_256.lmdb'))


def test_resume_after_a_hard_kill(prepared, inputs, tmp_path):
    """A forked copy of this process runs the job and dies with os._exit (no finally, no atexit: as SIGKILL) while
    storing the second image; the rerun finishes the job and gives what an uninterrupted run gives."""
    out = tmp_path / 'datasets'
    command = face_command(inputs, out, '--scenarios', '16_128', '--workers', 1, '--commit-every', 1)
    pid = os.fork()
    if pid == 0:  # child
        try:
            calls = []
            real_commit = prepare.commit_pairs

            def killed_commit(env, pairs, **kw):
                calls.append(1)
                if len(calls) == 3:
                    os._exit(137)
                return real_commit(env, pairs, **kw)

            prepare.commit_pairs = killed_commit
            run_cli(*command)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 137
    lr16 = out / 'FFHQ' / 'lr_16.lmdb'
    assert sorted(lmdb_items(str(lr16))) == ['00000']
    assert not (lr16 / 'meta_info.txt').exists() and not (lr16 / prepare.COMPLETE_FILE).exists()
    option_file = tmp_path / 'check.yml'
    option_file.write_text(f'scale: 8\ndatasets:\n  train:\n    dataroot_gt: {out / "FFHQ" / "hr_128.lmdb"}\n'
                           f'    dataroot_lq: {lr16}\n')
    code, log = run_cli('--check', option_file)
    assert code == 1, log
    assert_mentions(log, str(lr16), 'incomplete', 'rerun')
    assert 'not a BasicSR LMDB' not in log
    code, log = run_cli(*command)  # the dead writer's lock was freed with it
    assert code == 0, log
    assert_mentions(log, '2 input(s) written', '1 already present', '0 failed')
    for name in ('lr_16', 'hr_128'):
        reference = str(prepared['out'] / 'FFHQ' / f'{name}.lmdb')
        assert lmdb_items(str(out / 'FFHQ' / f'{name}.lmdb')) == lmdb_items(reference)


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------

def test_unreadable_and_small_images_are_reported_and_skipped(inputs, tmp_path):
    folder = tmp_path / 'faces'
    good = _save(str(folder / 'good.png'), inputs['faces']['00000'])
    (folder / 'corrupt.png').write_bytes(b'not an image at all')
    with open(good, 'rb') as f:
        data = f.read()
    (folder / 'truncated.png').write_bytes(data[:len(data) // 2])
    _save(str(folder / 'small.png'), inputs['faces']['00001'][:200, :300])
    out = tmp_path / 'datasets'
    code, log = run_cli('faces', '--input', folder, '--output', out, '--no-progress', '--workers', 1)
    assert code == 1, log
    assert_mentions(log, f'{folder / "corrupt.png"}: cannot read', f'{folder / "truncated.png"}: cannot read')
    assert_mentions(log, f'{folder / "small.png"}', '300x200', 'short side', '512')
    assert '3 input image(s) skipped' in log
    for name in ('lr_16', 'hr_512'):
        path = str(out / 'FFHQ' / f'{name}.lmdb')
        assert sorted(lmdb_items(path)) == ['good']
        assert not os.path.exists(os.path.join(path, prepare.COMPLETE_FILE))  # not complete: rerun retries them
    code, log = run_cli('faces', '--input', folder, '--output', out, '--no-progress', '--scenarios', '16_128',
                        '--workers', 1, '--name', 'small_ok')
    assert code == 1 and 'small.png' not in log  # 300x200 is large enough for 16 -> 128


def test_setup_errors_stop_before_any_work(inputs, tmp_path, monkeypatch):
    from yoda_plugin.attention.dino import WEIGHTS_ENV_VARS
    ffhq = inputs['root'] / 'ffhq'
    code, log = run_cli('faces', '--input', ffhq, '--output', ffhq / 'datasets', '--no-progress')
    assert code == 2, log
    assert_mentions(log, str(ffhq / 'datasets'), f'input folder {ffhq}')
    assert not (ffhq / 'datasets').exists()

    for var in WEIGHTS_ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.hub, '_hub_dir', torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / 'empty_hub'))
    out = tmp_path / 'datasets'
    code, log = run_cli(*face_command(inputs, out, '--attention', 'dino_resnet50:max'))
    assert code == 2 and 'dino_resnet50_pretrain.pth' in log and 'not found' in log, log
    assert not out.exists()
    for spec, message in (('edge:max', 'has no heads'), ('dino_vits8', 'needs its heads'),
                          ('canny', 'unknown source')):
        code, log = run_cli(*face_command(inputs, out, '--attention', spec))
        assert code == 2 and message in log, (spec, log)

    from yoda_plugin.data.lmdb_images import write_image_lmdb
    foreign = out / 'FFHQ' / 'hr_128.lmdb'
    foreign.parent.mkdir(parents=True)
    write_image_lmdb(str(foreign), {'x': np.zeros((4, 4, 3), np.uint8)})
    before = sorted(os.listdir(foreign))
    code, log = run_cli(*face_command(inputs, out, '--scenarios', '16_128'))
    assert code == 2, log
    assert_mentions(log, str(foreign), 'prepare_data')
    assert sorted(lmdb_items(str(foreign))) == ['x']  # untouched
    assert sorted(os.listdir(foreign)) == before and not (foreign / prepare.LOCK_FILE).exists()
    assert os.listdir(out / 'FFHQ') == ['hr_128.lmdb']  # refused before any target was made


# --------------------------------------------------------------------------------------------------------------
# reruns with other settings
# --------------------------------------------------------------------------------------------------------------

def _files(root):
    """{relative path: bytes} of every file under ``root`` but lock files (what a refused rerun must keep)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith('.lock'):
                path = os.path.join(folder, name)
                with open(path, 'rb') as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def _one_error(log):
    errors = [line for line in log.splitlines() if 'error:' in line]
    assert len(errors) == 1 and 'Traceback' not in log, log
    return errors[0]


def test_rerun_with_other_inputs_is_refused_until_forced(inputs, tmp_path):
    out = tmp_path / 'datasets'
    base = ['--output', out, '--scenarios', '16_128', '--workers', 1, '--no-progress', '--attention', 'edge']
    assert run_cli('faces', '--input', inputs['root'] / 'ffhq', *base)[0] == 0
    before = _files(out)
    other = tmp_path / 'other'
    _save(str(other / 'zz.png'), inputs['faces']['00000'])
    code, log = run_cli('faces', '--input', other, *base)
    line = _one_error(log)
    assert code == 2 and str(out / 'FFHQ' / 'lr_16.lmdb') in line and "['00000', '00001', '00002']" in line
    assert '--force' in line and '--output' in line
    assert _files(out) == before
    code, log = run_cli('faces', '--input', other, *base, '--force')
    assert code == 0, log
    names = sorted(os.listdir(out / 'FFHQ'))
    for name in ('lr_16', 'hr_128', 'attention_edge_16'):
        assert sum(n.startswith(f'{name}.lmdb_archived_') for n in names) == 1, names
        assert sorted(lmdb_items(str(out / 'FFHQ' / f'{name}.lmdb'))) == ['zz']


def test_rerun_with_another_recipe_or_attention_options_is_refused_until_forced(inputs, tmp_path):
    out = tmp_path / 'datasets'
    base = ['--output', out, '--scenarios', '16_128', '--workers', 1, '--no-progress', '--limit', 1]
    assert run_cli('faces', '--input', inputs['root'] / 'ffhq', *base, '--attention', 'edge')[0] == 0
    lr16 = out / 'FFHQ' / 'lr_16.lmdb'
    recipe = json.loads((lr16 / prepare.RECIPE_FILE).read_text())
    marker = (lr16 / prepare.COMPLETE_FILE).read_text()
    (lr16 / prepare.RECIPE_FILE).write_text(json.dumps({**recipe, 'resize': 'older'}))  # an unfinished older run
    (lr16 / prepare.COMPLETE_FILE).unlink()
    before = _files(out)
    code, log = run_cli('faces', '--input', inputs['root'] / 'ffhq', *base, '--attention', 'edge')
    line = _one_error(log)
    assert code == 2 and str(lr16) in line and 'resize: "older" -> ' in line and '--force' in line
    assert _files(out) == before
    (lr16 / prepare.RECIPE_FILE).write_text(json.dumps(recipe))
    (lr16 / prepare.COMPLETE_FILE).write_text(marker)
    before = _files(out)

    changed = ['--attention', 'edge', '--attention-opt', 'edge.blur_sigma=0.1']
    code, log = run_cli('faces', '--input', inputs['root'] / 'ffhq', *base, *changed)
    line = _one_error(log)
    assert code == 2 and 'attention_edge_16.lmdb' in line and 'source.blur_sigma: 0.03 -> 0.1' in line, log
    assert _files(out) == before
    code, log = run_cli('faces', '--input', inputs['root'] / 'ffhq', *base, *changed, '--force')
    assert code == 0, log
    assert any(n.startswith('attention_edge_16.lmdb_archived_') for n in os.listdir(out / 'FFHQ'))
    meta = json.loads((out / 'FFHQ' / 'attention_edge_16.lmdb' / 'yoda_attention.json').read_text())
    assert meta['source']['blur_sigma'] == 0.1


# --------------------------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------------------------

def test_check_passes_on_the_prepared_layout_and_names_each_problem(prepared, tmp_path):
    opts = [os.path.join(REPO, 'options', n) for n in ('train_sr3_yoda.yml', 'test_srdiff_yoda.yml')]
    code, log = run_cli('--check', *opts, '--root', prepared['root'])
    assert code == 0 and 'layout OK' in log, log

    root = tmp_path / 'copy'
    shutil.copytree(prepared['out'] / 'CelebA-HQ', root / 'datasets' / 'CelebA-HQ')
    celeba = root / 'datasets' / 'CelebA-HQ'
    test_opt = os.path.join(REPO, 'options', 'test_sr3_yoda.yml')
    # attention maps of another source under the expected name
    shutil.rmtree(celeba / 'attention_dino_resnet50_max_16.lmdb')
    shutil.copytree(prepared['out'] / 'FFHQ' / 'attention_edge_16.lmdb', celeba / 'attention_dino_resnet50_max_16.lmdb')
    # an HR image without its LR partner, and LR images of the wrong scale
    env = lmdb.open(str(celeba / 'lr_16.lmdb'))
    with env.begin(write=True) as txn:
        txn.delete(b'wide')
    env.close()
    with open(celeba / 'lr_16.lmdb' / 'meta_info.txt', 'w') as f:
        f.write('10000.png (16,16,3) 1\n')
    shutil.rmtree(celeba / 'hr_256.lmdb')
    shutil.copytree(celeba / 'hr_512.lmdb', celeba / 'hr_256.lmdb')
    problems = prepare.check_layout(test_opt, str(root), log=lambda *_: None)
    text = '\n'.join(problems)
    assert 'LR and HR keys differ' in text and "'wide'" in text
    assert_mentions(text, 'source.name', '"dino_resnet50"', '"edge"')
    assert_mentions(text, 'attention map', '2 key(s)', "['10000', 'wide']")  # the edge maps are FFHQ's
    problems = prepare.check_layout(os.path.join(REPO, 'options', 'test_sr3_64_256.yml'), str(root),
                                    log=lambda *_: None)
    assert any('HR size is not 4 x LR size' in p and '(512, 512)' in p for p in problems), problems
    code, log = run_cli('--check', test_opt, '--root', root)
    assert code == 1 and 'problem(s)' in log


# --------------------------------------------------------------------------------------------------------------
# every scenario's option file reads the prepared folder
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: os.path.basename(p))
def test_option_file_builds_its_datasets_from_the_prepared_folder(path, prepared):
    from basicsr.data import build_dataset

    from yoda_plugin.utils.options import load_options
    root = str(prepared['root'])
    assert prepare.check_layout(path, root, log=lambda *_: None) == []
    opt = load_options(path)
    scale = opt['scale']
    for phase, section in opt['datasets'].items():
        ds = copy.deepcopy(section)
        ds['phase'], ds['scale'] = phase.split('_')[0], scale
        for key in [k for k in ds if k.startswith('dataroot_')]:
            ds[key] = os.path.join(root, ds[key])
        dataset = build_dataset(ds)
        batch_size = 2 if ds['phase'] == 'train' else 1
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)))
        if ds.get('gt_size'):
            hr_hw = (ds['gt_size'], ds['gt_size'])
        elif 'DIV2K' in ds['dataroot_gt']:
            hr_hw = (340, 508)
        else:
            size = int(os.path.basename(ds['dataroot_gt']).split('_')[1].split('.')[0])  # hr_<size>.lmdb
            hr_hw = (size, size)
        lr_hw = (hr_hw[0] // scale, hr_hw[1] // scale)
        assert tuple(batch['gt'].shape) == (batch_size, 3) + hr_hw
        assert tuple(batch['lq'].shape) == (batch_size, 3) + lr_hw
        assert tuple(batch['lq_up'].shape) == (batch_size, 3) + hr_hw
        if ds.get('dataroot_attention'):
            assert tuple(batch['attention'].shape) == (batch_size, 1) + hr_hw
        else:
            assert 'attention' not in batch
