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


@pytest.mark.slow
def test_demo_pipeline_is_deterministic(tmp_path):
    """Two fresh demo runs (data, attention precompute, vanilla and YODA training, validation, test) at a tiny
    size give the same checkpoint tensors, the same metrics and the same images, bit for bit. The second run
    leaves out the shipped models (``--no-converged``, to keep CI short); their evaluation is reproduced
    against the values recorded in the checkpoints by tests/test_convergence.py."""
    import glob
    import json
    import re
    import subprocess
    import sys

    import torch

    from conftest import REPO, run_env
    runs = []
    for name, extra in (('a', []), ('b', ['--no-converged'])):
        root = tmp_path / name
        proc = subprocess.run([sys.executable, '-m', 'yoda_plugin', 'demo', '--root', str(root), '--iters', '2']
                              + extra, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert '(2 CPU threads)' in proc.stdout
        table = [m.group(1) for m in re.finditer(r'^  (bicubic|SR3 \+ YODA|SR3) +[0-9]', proc.stdout, re.M)]
        figure = root / 'results' / 'demo_comparison' / 'demo_comparison.png'
        if extra:  # only the from-scratch models, shown in the figure
            assert table == ['bicubic', 'SR3', 'SR3 + YODA'] and 'shipped models' not in proc.stdout
            assert f'models trained 2 iterations): {figure}' in proc.stdout
        else:
            assert table == ['bicubic', 'SR3', 'SR3 + YODA'] * 2  # converged models, then trained from scratch
            assert 'shipped models (yoda_plugin/weights' in proc.stdout
            assert f'shipped models): {figure}' in proc.stdout
        run = {'figure': figure.read_bytes(), 'table': json.loads((figure.parent / 'demo_table.json').read_text())}
        for exp, test in (('demo_SR3_x4', 'demo_test_SR3_x4'), ('demo_SR3_YODA_x4', 'demo_test_SR3_YODA_x4')):
            run[exp] = torch.load(root / 'experiments' / exp / 'models' / 'net_g_latest.pth', weights_only=True)
            results = root / 'results' / test
            run[test] = json.loads((results / 'summary_demo_val.json').read_text())
            run[test + '/images'] = {os.path.basename(p): open(p, 'rb').read()
                                     for p in sorted(glob.glob(str(results / 'visualization' / '*' / '*.png')))}
        runs.append(run)
    a, b = runs
    for exp in ('demo_SR3_x4', 'demo_SR3_YODA_x4'):
        for key in ('params', 'params_ema'):
            assert a[exp][key].keys() == b[exp][key].keys()
            assert all(torch.equal(a[exp][key][k], b[exp][key][k]) for k in a[exp][key]), (exp, key)
    # Same seed and data: the two methods differ only by YODA (vanilla updates every pixel).
    assert not torch.equal(a['demo_SR3_x4']['params']['conv_out.weight'],
                           a['demo_SR3_YODA_x4']['params']['conv_out.weight'])
    for test in ('demo_test_SR3_x4', 'demo_test_SR3_YODA_x4'):
        assert a[test]['metrics'] == b[test]['metrics'] and a[test]['update_ratio'] == b[test]['update_ratio']
        assert a[test + '/images'] == b[test + '/images'] and len(a[test + '/images']) >= 6
    assert a['demo_test_SR3_x4']['update_ratio'] == 1.0 > a['demo_test_SR3_YODA_x4']['update_ratio']
    assert a['figure'] != b['figure']  # the shipped models against 2 iterations of training
    seconds = {'sec_per_image', 'train_seconds'}  # wall-clock columns differ between runs

    def timeless(rows):
        return {m: {k: v for k, v in row.items() if k not in seconds} for m, row in rows.items()}
    assert timeless(a['table']['from_scratch']) == timeless(b['table']['from_scratch'])
    assert a['table']['bicubic'] == b['table']['bicubic']
    assert set(a['table']) == {'bicubic', 'converged', 'from_scratch'}
    assert set(b['table']) == {'bicubic', 'from_scratch'}
    assert set(a['table']['converged']) == set(a['table']['from_scratch']) == {'SR3', 'SR3 + YODA'}
    # The shipped converged models are the ones tested: their PSNR beats 2 iterations of training by far.
    assert a['table']['converged']['SR3 + YODA']['psnr'] > a['table']['from_scratch']['SR3 + YODA']['psnr'] + 5
