"""The demo deletes only folders it made itself, says so, and refuses to touch anything else."""
import os

import pytest

from yoda_plugin import demo


def test_remove_own_deletes_only_claimed_folders(tmp_path, capsys):
    root = str(tmp_path)
    theirs = tmp_path / 'datasets' / 'demo'
    theirs.mkdir(parents=True)
    (theirs / 'my_photo.png').write_bytes(b'precious')
    with pytest.raises(demo.DemoRefusal, match='was not made by the demo'):
        demo.remove_own(root, str(theirs), 'incomplete')
    assert (theirs / 'my_photo.png').read_bytes() == b'precious'

    ours = tmp_path / 'experiments' / 'demo_run'
    demo.claim(root, str(ours))
    ours.mkdir(parents=True)
    (ours / 'log.txt').write_text('old run')
    demo.remove_own(root, str(ours), 'a new demo run trains from scratch')
    assert not ours.exists()
    assert f'removing {ours}' in capsys.readouterr().out
    demo.remove_own(root, str(ours), 'gone already')  # nothing there: nothing to do


def test_demo_refuses_an_experiment_folder_it_did_not_make(tmp_path, capsys):
    data = tmp_path / 'datasets' / 'demo'
    data.mkdir(parents=True)
    (data / 'COMPLETE').write_text('')  # reuse "built" data: no build, nothing deleted there
    exp = tmp_path / 'experiments' / 'demo_SR3_YODA_x4'
    exp.mkdir(parents=True)
    (exp / 'notes.txt').write_text('mine')
    assert demo.main(['--root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'was not made by the demo' in err and str(exp) in err
    assert (exp / 'notes.txt').read_text() == 'mine' and sorted(os.listdir(tmp_path)) == ['datasets', 'experiments']


def test_demo_pipeline_is_deterministic(tmp_path):
    """Two fresh demo runs (data, attention precompute, training, validation, test) at a tiny size give the
    same checkpoint tensors, the same metrics and the same SR images, bit for bit."""
    import glob
    import json
    import subprocess
    import sys

    import torch

    from conftest import REPO, run_env
    runs = []
    for name in ('a', 'b'):
        root = tmp_path / name
        proc = subprocess.run([sys.executable, '-m', 'yoda_plugin', 'demo', '--root', str(root), '--iters', '2'],
                              cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert '(2 CPU threads)' in proc.stdout
        ckpt = torch.load(root / 'experiments' / 'demo_SR3_YODA_x4' / 'models' / 'net_g_latest.pth',
                          weights_only=True)
        results = root / 'results' / 'demo_test_SR3_YODA_x4'
        summary = json.loads((results / 'summary_demo_val.json').read_text())
        images = {os.path.basename(p): open(p, 'rb').read()
                  for p in sorted(glob.glob(str(results / 'visualization' / '*' / '*.png')))}
        runs.append((ckpt, summary, images))
    (ca, sa, ia), (cb, sb, ib) = runs
    for key in ('params', 'params_ema'):
        assert ca[key].keys() == cb[key].keys()
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    assert sa['metrics'] == sb['metrics'] and sa['update_ratio'] == sb['update_ratio']
    assert len(ia) == 6 * 2 and ia == ib  # 6 SR images and their attention maps
