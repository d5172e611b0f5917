"""The GPU check (issue 17) at toy sizes on the CPU: every row it promises, all passing, and failures counted."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import run_env

from yoda_plugin import gpu_check

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
    cmd = [sys.executable, '-m', 'yoda_plugin.gpu_check', '--device', 'cpu', '--quick', '--out', str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=timeout)
    table = json.loads((out / 'table.json').read_text()) if (out / 'table.json').exists() else None
    return proc, out, table


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
    assert err.value.code == 2 and '--device cpu needs --quick' in capsys.readouterr().err
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
