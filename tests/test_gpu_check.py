"""The GPU check at toy sizes on the CPU: every row it promises, all passing, and failures counted."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import REPO, assert_mentions, run, run_env

from yoda_plugin.apps import gpu_check

MODELS = ('sr3', 'srdiff')
SCENARIOS = (128, 256, 512)
# Rows that cannot apply on a CPU: they must say SKIP with a reason, never PASS.
CPU_SKIPS = {'env/cuda'} | {f'network/{s}/train/fp16' for s in SCENARIOS}


def expected_rows():
    rows = {'env/cuda', 'attention/dino_vits8', 'attention/dino_resnet50'}
    rows |= {f'train/{m}/{v}' for m in MODELS for v in ('fp32', 'bf16', 'fp16', 'channels_last', 'compile')}
    rows |= {f'torchrun/{m}{r}' for m in MODELS for r in ('', '/resume')}
    for s in SCENARIOS:
        rows |= {f'network/{s}/train/{v}' for v in ('fp32', 'bf16', 'fp16', 'channels_last+bf16', 'yoda_vs_vanilla')}
        rows |= {f'network/{s}/sample/{v}' for v in ('ddpm', 'ddim', 'dpmpp_2m', 'yoda_vs_vanilla', 'sparse_vs_dense')}
    return rows


def run_check(tmp_path, *args, timeout=600):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'yoda_plugin.apps.gpu_check', '--device', 'cpu', '--quick', '--out', str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=timeout)
    table = json.loads((out / 'table.json').read_text()) if (out / 'table.json').exists() else None
    return proc, out, table


@pytest.mark.slow
def test_quick_cpu_check_runs_every_row_and_passes(tmp_path):
    proc, out, table = run_check(tmp_path)
    assert proc.returncode == 0, f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    rows = {r['id']: r for r in table['rows']}
    assert set(rows) == expected_rows() and len(table['rows']) == len(rows)  # each row once
    for rid, row in rows.items():
        assert row['status'] == ('SKIP' if rid in CPU_SKIPS else 'PASS'), row
    for rid in CPU_SKIPS:
        assert rows[rid]['note'].startswith('n/a on cpu'), rows[rid]
    assert table['counts'] == {'PASS': len(rows) - len(CPU_SKIPS), 'FAIL': 0, 'TIMEOUT': 0, 'SKIP': len(CPU_SKIPS)}
    # what the rows prove, as their values and paths say
    assert 'gloo' in rows['torchrun/sr3']['path'] and '--auto_resume' in rows['torchrun/sr3/resume']['path']
    resumed = rows['torchrun/sr3/resume']['value']
    assert '4 iterations' in resumed and 'loss scale' in resumed
    assert 'loss scale' in rows['train/sr3/fp16']['value'] and 'loss scale' in rows['train/srdiff/fp16']['value']
    for m in MODELS:
        graphs = int(rows[f'train/{m}/compile']['value'].split(' graphs compiled')[0].rsplit(' ', 1)[1])
        assert graphs >= 2  # the trained network's forward and the sampling network's
    assert 'pixels evaluated' in rows['network/512/sample/sparse_vs_dense']['value']
    assert 'maps/s' in rows['attention/dino_vits8']['value']
    # the table on stdout and in both files, whose path is printed
    md = (out / 'table.md').read_text()
    assert all(f'| {rid} |' in md and f'| {rid} |' in proc.stdout for rid in rows)
    assert f'table: {out / "table.md"}' in proc.stdout
    assert (out / 'work' / 'logs' / 'torchrun_sr3_resume.log').exists()


@pytest.mark.slow
def test_a_failing_row_is_reported_the_rest_runs_and_the_exit_status_is_1(tmp_path):
    proc, out, table = run_check(tmp_path, '--stages', 'env,attention', '--fail-row', 'attention/dino_vits8')
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = {r['id']: r for r in table['rows']}
    assert rows['attention/dino_vits8']['status'] == 'FAIL'
    assert 'injected failure' in rows['attention/dino_vits8']['note']
    assert rows['attention/dino_resnet50']['status'] == 'PASS'  # the check went on after the failure
    assert rows['env/cuda']['status'] == 'SKIP'
    assert 'failed: attention/dino_vits8' in proc.stdout
    assert table['counts']['FAIL'] == 1


def test_refuses_bad_arguments_before_doing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.main(['--device', 'cpu', '--out', str(tmp_path / 'a')])
    assert err.value.code == 2
    assert_mentions(capsys.readouterr().err, '--device cpu', '--quick')
    with pytest.raises(SystemExit) as err:
        gpu_check.main(['--device', 'cpu', '--quick', '--stages', 'env,gpu', '--out', str(tmp_path / 'b')])
    assert err.value.code == 2 and 'unknown gpu' in capsys.readouterr().err
    earlier = tmp_path / 'earlier'
    earlier.mkdir()
    (earlier / 'table.md').write_text('an earlier result')
    with pytest.raises(SystemExit) as err:
        gpu_check.main(['--device', 'cpu', '--quick', '--out', str(earlier)])
    assert err.value.code == 2 and 'not empty' in capsys.readouterr().err
    assert (earlier / 'table.md').read_text() == 'an earlier result'
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as err:
            gpu_check.main(['--device', 'cuda', '--out', str(tmp_path / 'c')])
        assert err.value.code == 2 and 'CUDA is not available' in capsys.readouterr().err


def test_training_checks_name_what_a_run_did_not_do(tmp_path):
    """check_training_output on hand-made logs and states: each missing proof is named."""
    exp = tmp_path / 'exp'
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    torch.save({'params': {}}, exp / 'models' / 'net_g_latest.pth')
    torch.save({'iter': 4, 'grad_scaler': {'scale': 1024.0}}, exp / 'training_states' / '4.state')
    dump = '  train:[\n    total_iter: 4\n    amp: fp16\n  ]\n  val:[\n    amp: fp16\n  ]\n'
    good = (dump + 'num_gpu: 0\nWorld size (gpu number): 1\nResuming training from epoch: 0, iter: 2.\n'
            'Ranks in sync at iteration 4: identical\nValidation check_val: ...\nEnd of training.\n')
    run = gpu_check.TrainingRun('torchrun/sr3/resume', 'x', 'sr3', {'amp': 'fp16'}, torchrun=True, resume=True)
    assert gpu_check.check_training_output(run, 0, '', good, str(exp), 4, cuda=False) == []
    problems = gpu_check.check_training_output(run, 0, '', good.replace('Resuming', 'Starting'), str(exp), 4, False)
    assert problems == ['did not resume from iteration 2']
    problems = gpu_check.check_training_output(run, 0, 'no nccl here', good, str(exp), 4, cuda=True)
    assert problems == ['the run did not use the GPU (num_gpu 0)',
                        'torchrun: no NCCL initialisation in the output (NCCL_DEBUG=INFO)']
    problems = gpu_check.check_training_output(run, 0, '', good.replace('  val:[\n    amp: fp16\n', '  val:[\n'),
                                               str(exp), 4, False)
    assert problems == ['val.amp missing from the options in the log']
    torch.save({'iter': 4}, exp / 'training_states' / '4.state')  # fp16 without the GradScaler's state
    problems = gpu_check.check_training_output(run, 1, 'Traceback\nboom', good, str(exp), 4, False)
    assert problems == ['exit code 1: Traceback / boom', 'no valid GradScaler state in 4.state (scale None)']


def test_embedded_scenarios_are_the_option_files():
    """The check reads no option file (an installed package has none); its scenarios say what the files say."""
    from yoda_plugin.utils.options import load_options
    for path, embedded in gpu_check.SCENARIOS.items():
        opt = load_options(os.path.join(REPO, path))
        for key in ('name', 'model_type', 'scale', 'diffusion', 'yoda'):
            assert embedded[key] == opt[key], (path, key)
        assert embedded['network_g'] == {k: v for k, v in opt['network_g'].items() if k != 'use_checkpoint'}, path
        assert opt['network_g'].get('use_checkpoint', False) is False
        assert all(embedded['train'][k] == opt['train'][k] for k in embedded['train']), path
        assert embedded['datasets']['train']['batch_size_per_gpu'] == opt['datasets']['train']['batch_size_per_gpu']


@pytest.mark.slow
def test_an_installed_wheel_runs_the_quick_check_outside_the_clone(tmp_path):
    """``pip install .`` into a fresh environment (dependencies reused from this one), then the quick check from a
    folder outside the clone: the training runs under torchrun, the network and attention rows."""
    src = tmp_path / 'src'
    shutil.copytree(os.path.join(REPO, 'yoda_plugin'), src / 'yoda_plugin',
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for name in ('setup.py', 'README.md'):
        shutil.copy(os.path.join(REPO, name), src / name)
    run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation', '-q', '-w',
         str(tmp_path / 'wheel')], cwd=tmp_path, timeout=600)
    venv = tmp_path / 'venv'
    run([sys.executable, '-m', 'venv', str(venv)], cwd=tmp_path, timeout=300)
    python = str(venv / 'bin' / 'python')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '1'
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch, BasicSR, ... from this environment; its editable yoda_plugin is not seen (no .pth of it runs)
    with open(os.path.join(site, 'test_dependencies.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')
    wheel = glob.glob(str(tmp_path / 'wheel' / 'yoda_plugin-*.whl'))
    assert len(wheel) == 1, wheel
    subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', wheel[0]], env=env, check=True,
                   capture_output=True, timeout=600)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    where = subprocess.run([python, '-c', 'import yoda_plugin; print(yoda_plugin.__file__)'], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not the clone
    out = elsewhere / 'out'
    proc = subprocess.run([str(venv / 'bin' / 'yoda-gpu-check'), '--device', 'cpu', '--quick', '--stages',
                           'env,torchrun,network,attention', '--out', str(out)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    rows = {r['id']: r for r in json.loads((out / 'table.json').read_text())['rows']}
    assert rows['torchrun/sr3/resume']['status'] == 'PASS' and rows['network/512/train/fp32']['status'] == 'PASS'
    assert {r['status'] for r in rows.values()} <= {'PASS', 'SKIP'}
