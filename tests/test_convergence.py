"""Converged demo models and the learning-curve benchmark: shipped weights reproduce their record, bad
weights and foreign folders are named, plans refuse other settings and accumulate seeds, a real short run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_env, tiny_options, write_options
from yoda_plugin import demo
from yoda_plugin.experiments import convergence, stability
from yoda_plugin.utils.options import load_options

SCRIPT = os.path.join(REPO, 'scripts', 'benchmark_convergence.py')


@pytest.mark.parametrize('method', ['vanilla', 'yoda'])
def test_shipped_checkpoint_reproduces_its_recorded_check(method):
    """The shipped EMA weights, sampled as recorded (one thread, seed, sampler), give the recorded PSNR."""
    test_file = os.path.join(demo.options_dir(), 'test_sr3_yoda_demo.yml' if method == 'yoda' else 'test_sr3_demo.yml')
    record = demo.shipped_checkpoint(method, dict(load_options(test_file)['network_g']))
    assert record['training']['yoda_trained'] == (method == 'yoda')
    assert record['yoda']['enabled'] == (method == 'yoda') and record['scale'] == 4
    check = record['check']
    lr, hr = check['lr'].numpy(), check['hr'].numpy()
    assert lr.shape == (16, 16, 3) and hr.shape == (64, 64, 3)
    psnr = convergence.check_psnr(record['path'], method, lr, hr)
    assert psnr == pytest.approx(check['psnr'], abs=0.02)
    # They are converged. The target (within 1 dB of bicubic, LR-PSNR >= 35) is on the 8 validation crops, as
    # recorded at export; this one crop and seed, computed now, may spread by a few tenths of a dB around it.
    from basicsr.metrics.psnr_ssim import calculate_psnr
    from yoda_plugin.data.transforms import bicubic_resize
    bicubic = calculate_psnr(bicubic_resize(lr, hr.shape[:2], 'pil'), hr, crop_border=4, input_order='HWC')
    assert psnr > bicubic - 1.5, (psnr, bicubic)
    assert record['validation']['psnr'] > 26.5662 - 1.0 and record['validation']['lr_psnr'] >= 35  # bicubic: 26.5662
    assert record['diffusion']['prediction'] == 'v' and record['training']['iterations'] == 6000
    # BasicSR's own loader reads the file (the record beside the weights is ignored there).
    from basicsr.archs.arch_util import default_init_weights  # noqa: F401  (basicsr importable)
    from yoda_plugin.archs.sr3_unet_arch import SR3UNet
    net = SR3UNet(**{k: v for k, v in record['network_g'].items() if k != 'type'})
    state = torch.load(record['path'], map_location='cpu', weights_only=True)
    net.load_state_dict(state['params_ema'], strict=True)


@pytest.mark.parametrize('damage', ['missing', 'corrupted', 'other_network'])
def test_demo_names_a_missing_or_damaged_shipped_checkpoint(tmp_path, monkeypatch, capsys, damage):
    weights = tmp_path / 'weights'
    weights.mkdir()
    for method, name in demo.SHIPPED.items():
        (weights / name).write_bytes(open(os.path.join(demo.WEIGHTS_DIR, name), 'rb').read())
    target = weights / demo.SHIPPED['yoda']
    if damage == 'missing':
        target.unlink()
    elif damage == 'corrupted':
        target.write_bytes(target.read_bytes()[:1000])
    else:
        state = torch.load(target, weights_only=True)
        state['yoda_record']['network_g']['base_channels'] = 8
        torch.save(state, target)
    monkeypatch.setattr(demo, 'WEIGHTS_DIR', str(weights))
    root = tmp_path / 'root'
    assert demo.main(['--root', str(root)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and 'benchmark_convergence.py' in err
    assert {'missing': 'missing', 'corrupted': 'cannot be read', 'other_network': 'base_channels'}[damage] in err
    assert not (root / 'datasets').exists(), 'refused before any work'


def test_first_within_and_summary_table():
    assert convergence.first_within({500: 20.0, 1000: 25.6, 1500: 25.4}, 25.5) == 1000
    assert convergence.first_within({500: 20.0}, 25.5) is None
    rows = [{'method': m, 'batch': 4, 'seed': s, 'iter': it, 'psnr': p, 'ssim': 0.5, 'colour_shift': 1.0,
             'lr_psnr': 36.0}
            for m, s, it, p in [('yoda', 0, 500, 25.0), ('yoda', 0, 1000, 26.0), ('yoda', 1, 500, 26.0),
                                ('yoda', 1, 1000, 26.2), ('vanilla', 0, 500, 20.0), ('vanilla', 0, 1000, 24.0)]]
    bicubic = {'psnr': 26.5, 'ssim': 0.7, 'colour_shift': 0.2, 'lr_psnr': 37.0}
    table = convergence.summary_table(rows, bicubic, 1000)
    assert '| SR3 + YODA | 2 | 26.1000 ± 0.1000 |' in table
    yoda_row = next(line for line in table.splitlines() if line.startswith('| SR3 + YODA'))
    assert yoda_row.endswith('| 500; s0: 1000, s1: 500 |')  # mean 25.5 at 500 reaches 26.5 - 1
    vanilla_row = next(line for line in table.splitlines() if line.startswith('| SR3 |'))
    assert 'not reached; s0: -' in vanilla_row


def _stab_plan(tiny_data, tmp_path, **kw):
    opt = tiny_options(tiny_data, total_iter=2)
    base_path = write_options(tmp_path / 'base.yml', opt)
    args = dict(options=base_path, batch_sizes=[2], seeds=[0], iters=2, eval_every=1, root=str(tmp_path),
                prefix='stab', sampler={'type': 'ddpm', 'steps': 3, 'eta': 0.0})
    args.update(kw)
    return stability.StabilityPlan(**args), load_options(base_path)


def test_plan_refuses_other_settings_naming_the_keys_and_force_archives(tiny_data, tmp_path):
    plan, base = _stab_plan(tiny_data, tmp_path)
    stability.check_plan(plan, base)
    (tmp_path / 'experiments' / 'stab_yoda_b2_s0').mkdir(parents=True)
    record = json.loads((tmp_path / 'results' / 'stab' / 'plan.json').read_text())
    record['runs'] = ['stab_yoda_b2_s0']
    (tmp_path / 'results' / 'stab' / 'plan.json').write_text(json.dumps(record))
    # More seeds, more iterations: the same settings (runs accumulate, budgets extend).
    stability.check_plan(_stab_plan(tiny_data, tmp_path, seeds=[0, 1], iters=4)[0], base)
    other, _ = _stab_plan(tiny_data, tmp_path, overrides={'network_g.base_channels': 24})
    with pytest.raises(stability.PlanMismatch) as err:
        stability.check_plan(other, base)
    assert 'network_g.base_channels' in str(err.value) and '--force' in str(err.value)
    assert (tmp_path / 'experiments' / 'stab_yoda_b2_s0').is_dir(), 'a refused rerun changes nothing'
    forced, _ = _stab_plan(tiny_data, tmp_path, overrides={'network_g.base_channels': 24}, force=True)
    stability.check_plan(forced, base, log=lambda *a: None)
    archived = [p for p in os.listdir(tmp_path / 'experiments') if p.startswith('stab_yoda_b2_s0_archived_')]
    assert len(archived) == 1 and not (tmp_path / 'experiments' / 'stab_yoda_b2_s0').exists()


def test_plan_refuses_experiments_it_has_no_record_of(tiny_data, tmp_path):
    plan, base = _stab_plan(tiny_data, tmp_path)
    (tmp_path / 'experiments' / 'stab_vanilla_b2_s0').mkdir(parents=True)
    with pytest.raises(stability.PlanMismatch, match='stab_vanilla_b2_s0'):
        stability.check_plan(plan, base)


def test_benchmark_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / 'thesis.tex').write_text('mine')
    proc = subprocess.run([sys.executable, SCRIPT, '--root', str(tmp_path), '--iters', '2', '--eval-every', '1'],
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(tmp_path) in proc.stderr and 'thesis.tex' in proc.stderr and 'Traceback' not in proc.stderr
    assert os.listdir(tmp_path) == ['thesis.tex']


@pytest.mark.slow
def test_short_benchmark_writes_curves_summary_plot_and_resumes(tmp_path):
    root = tmp_path / 'conv'
    cmd = [sys.executable, SCRIPT, '--root', str(root), '--iters', '2', '--eval-every', '1', '--seeds', '0',
           '--sampler', 'ddpm:2', '--jobs', '2', '--threads', '1', '--set', 'network_g.base_channels=8',
           '--set', 'network_g.norm_groups=4']
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = root / 'results' / 'convergence'
    rows = (out / 'convergence.csv').read_text().splitlines()
    assert rows[0].startswith('method,batch,seed,iter,psnr') and len(rows) == 1 + 2 * 2  # 2 methods x 2 evals
    summary = (out / 'convergence.md').read_text()
    assert '| bicubic |' in summary and '| SR3 + YODA | 1 |' in summary and 'within 1 dB' in summary
    assert (out / 'convergence.png').stat().st_size > 10000 and (out / 'bicubic.json').is_file()
    assert (out / 'logs' / 'convergence_yoda_b4_s0.log').is_file()
    again = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count('finished earlier, kept') == 2
    other = subprocess.run(cmd[:-4] + ['--set', 'network_g.base_channels=16'], cwd=tmp_path, env=run_env(),
                           capture_output=True, text=True, timeout=900)
    assert other.returncode == 2 and 'network_g.base_channels' in other.stderr and 'Traceback' not in other.stderr


@pytest.mark.slow
def test_gpu_check_script_runs_the_convergence_stage_in_quick_mode(tmp_path):
    """scripts/gpu_check.sh --quick on the CPU: the check's env row, then the convergence stage at a toy size."""
    import shutil
    env = run_env()
    env['YODA_VENV'] = os.path.dirname(os.path.dirname(sys.executable))  # the running venv: no install
    proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'gpu_check.sh'), '--device', 'cpu', '--quick',
                           '--stages', 'env', '--out', str(tmp_path / 'check')], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '[gpu_check] convergence stage' in proc.stdout and '[convergence] at iteration 2' in proc.stdout
    roots = [line.split('--root ')[1].split()[0] for line in proc.stdout.splitlines()
             if line.startswith('[gpu_check] convergence stage')]
    out = os.path.join(REPO, roots[0], 'results', 'convergence')
    try:
        assert os.path.isfile(os.path.join(out, 'convergence.png'))
        assert '| SR3 + YODA | 1 |' in open(os.path.join(out, 'convergence.md'), encoding='utf-8').read()
    finally:
        shutil.rmtree(os.path.join(REPO, roots[0]))
