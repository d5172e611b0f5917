"""The stability experiment driver: derived option files, statistics over seeds, a real resumable short run."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO, mentions, run_env, tiny_options, write_options
from yoda_plugin.experiments import stability
from yoda_plugin.utils.options import load_options

SCRIPT = os.path.join(REPO, 'scripts', 'run_stability_experiment.py')


def _plan(options, root, **kw):
    args = dict(options=str(options), batch_sizes=[2], seeds=[0, 1], iters=2, eval_every=1, root=str(root),
                prefix='stab', sampler={'type': 'ddpm', 'steps': 3, 'eta': 0.0})
    args.update(kw)
    return stability.StabilityPlan(**args)


def test_methods_differ_only_in_yoda_batch_seed_and_name(tiny_data, tmp_path):
    base_path = write_options(tmp_path / 'base.yml', tiny_options(tiny_data))
    base = load_options(base_path)
    plan = _plan(base_path, tmp_path, overrides={'network_g.base_channels': 8})
    vanilla = stability.run_options(base, plan, 'vanilla', 4, 1)
    yoda = stability.run_options(base, plan, 'yoda', 4, 1)
    assert vanilla['yoda'] == {'enabled': False}
    assert yoda['yoda'] == dict(base['yoda'], enabled=True)
    assert (vanilla['name'], yoda['name']) == ('stab_vanilla_b4_s1', 'stab_yoda_b4_s1')
    for opt in (vanilla, yoda):
        assert opt['manual_seed'] == 1 and opt['datasets']['train']['batch_size_per_gpu'] == 4
        assert opt['network_g']['base_channels'] == 8 and opt['train']['total_iter'] == 2
        assert opt['val']['val_freq'] == 1 and opt['logger']['save_checkpoint_freq'] == 1
        assert opt['val']['sampler'] == {'type': 'ddpm', 'steps': 3, 'eta': 0.0}
    same = {k for k in base if k not in ('yoda', 'name', 'manual_seed', 'datasets', 'network_g', 'train', 'val',
                                         'logger', 'path', 'yoda_plugin')}
    assert all(vanilla[k] == yoda[k] == base[k] for k in same)
    assert vanilla['datasets'] == yoda['datasets']  # the same data (attention read, unused by vanilla)
    assert base['datasets']['train']['batch_size_per_gpu'] == 2, 'the base options must not be modified'


def test_bad_plans_and_overrides_name_what_is_wrong(tiny_data, tmp_path):
    base_path = write_options(tmp_path / 'base.yml', tiny_options(tiny_data))
    base = load_options(base_path)
    with pytest.raises(KeyError, match=mentions("'network_gg'")):
        stability.run_options(base, _plan(base_path, tmp_path, overrides={'network_gg.width': 1}), 'yoda', 2, 0)
    vanilla_path = write_options(tmp_path / 'vanilla.yml', tiny_options(tiny_data, yoda=False))
    with pytest.raises(ValueError, match=mentions('vanilla.yml', 'yoda:')):
        stability.run_options(load_options(vanilla_path), _plan(vanilla_path, tmp_path), 'yoda', 2, 0)
    with pytest.raises(ValueError, match='eval_every'):
        _plan(base_path, tmp_path, eval_every=5)
    with pytest.raises(ValueError, match='unknown method'):
        _plan(base_path, tmp_path, methods=['yoda', 'sr3'])
    with pytest.raises(ValueError, match='expected KEY=VALUE'):
        stability.parse_override('network_g.base_channels')
    assert stability.parse_override('a.b=[1, 2]') == ('a.b', [1, 2])
    assert stability.parse_override('a.lr=1e-4') == ('a.lr', 1e-4) and stability.parse_override('a=x') == ('a', 'x')


def test_summary_statistics_over_seeds():
    rows = [{'method': 'yoda', 'batch': 2, 'seed': s, 'iter': 10, 'psnr': v} for s, v in enumerate((20., 22., 24.))]
    rows += [{'method': 'vanilla', 'batch': 2, 'seed': 0, 'iter': 10, 'psnr': 18.0}]
    stats = stability.summarize(rows, ['psnr'])
    mean, std, lo, hi, n = stats[('yoda', 2, 10)]['psnr']
    assert (mean, lo, hi, n) == (22.0, 20.0, 24.0, 3) and std == pytest.approx((8 / 3) ** 0.5)
    assert stats[('vanilla', 2, 10)]['psnr'] == (18.0, 0.0, 18.0, 18.0, 1)
    table = stability.final_table(rows, 10)
    assert '| 2 | vanilla | 1 | 10 | 18.0000 ± 0.0000 |' in table and '| 2 | yoda | 3 | 10 | 22.0000 ± 1.6330 |' in table


def test_summary_reports_each_batch_at_its_budget_with_the_psnr_change_that_says_converged():
    # batch 2 trained 30 iterations, batch 8 trained 20; evaluations every 5.
    def run(method, batch, seed, curve):
        return [{'method': method, 'batch': batch, 'seed': seed, 'iter': 5 * (i + 1), 'psnr': v}
                for i, v in enumerate(curve)]
    rows = (run('yoda', 2, 0, [10, 12, 14, 16, 17, 18]) + run('yoda', 2, 1, [10, 12, 14, 16, 18, 20])
            + run('vanilla', 8, 0, [20, 22, 23, 23]) + run('yoda', 8, 9, [1, 2, 3, 4, 5, 6, 7]))
    table = stability.final_table(rows, {2: 30, 8: 20}, window=10).splitlines()
    assert table[0].endswith('| psnr | PSNR change over the last 10 iterations |')
    # batch 2 at 30: psnr 19 ± 1; change 18-16=2 and 20-16=4 -> +3 ± 1
    assert '| 2 | yoda | 2 | 30 | 19.0000 ± 1.0000 | +3.0000 ± 1.0000 |' in table
    # batch 8 at 20 (seed 9 ran on to 35: its row at 20 counts, later ones do not): change 23-22 and 4-2
    assert '| 8 | vanilla | 1 | 20 | 23.0000 ± 0.0000 | +1.0000 ± 0.0000 |' in table
    assert '| 8 | yoda | 1 | 20 | 4.0000 ± 0.0000 | +2.0000 ± 0.0000 |' in table
    assert len(table) == 5


def test_per_batch_budgets_set_total_iter_and_are_checked(tiny_data, tmp_path):
    base_path = write_options(tmp_path / 'base.yml', tiny_options(tiny_data))
    base = load_options(base_path)
    plan = _plan(base_path, tmp_path, batch_sizes=[2, 8], iters=4, batch_iters={2: 6})
    assert plan.iters_for(2) == 6 and plan.iters_for(8) == 4 and plan.max_iters == 6
    assert stability.run_options(base, plan, 'yoda', 2, 0)['train']['total_iter'] == 6
    assert stability.run_options(base, plan, 'vanilla', 8, 0)['train']['total_iter'] == 4
    with pytest.raises(ValueError, match=mentions('batch_iters[2]', 'multiple of eval_every')):
        _plan(base_path, tmp_path, eval_every=2, iters=4, batch_iters={2: 5})
    with pytest.raises(ValueError, match=mentions('[4]', 'not among the batch sizes')):
        _plan(base_path, tmp_path, batch_iters={4: 10})
    assert stability.parse_batch_iters(['2=12000', '8=6000']) == {2: 12000, 8: 6000}
    with pytest.raises(ValueError, match=mentions("'2:100'", 'BATCH=ITERS')):
        stability.parse_batch_iters(['2:100'])
    # The command line refuses them before any work, in one line that names the option.
    for bad, words in ((['2:100'], ['--batch-iters', "'2:100'"]), (['4=100'], ['batch_iters', '[4]'])):
        proc = subprocess.run([sys.executable, SCRIPT, '--demo', '--root', str(tmp_path / 'never'), '--batch-sizes',
                               '2', '--iters', '100', '--eval-every', '50', '--batch-iters', *bad],
                              env=run_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr
    assert not (tmp_path / 'never').exists()


@pytest.mark.slow
def test_short_experiment_writes_table_plots_and_resumes(tiny_data, tmp_path):
    opt = tiny_options(tiny_data, total_iter=2)
    opt['logger']['use_tb_logger'] = False
    base_path = write_options(tmp_path / 'base.yml', opt)
    cmd = [sys.executable, SCRIPT, '--options', base_path, '--root', str(tmp_path), '--prefix', 'stab',
           '--batch-sizes', '2', '--seeds', '0', '1', '--iters', '2', '--eval-every', '1', '--sampler', 'ddpm:3']
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / 'results' / 'stab'
    with open(results / 'stability.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    # 2 methods x 2 seeds x evaluations at iterations 1 and 2
    assert sorted((r['method'], r['seed'], r['iter']) for r in rows) == sorted(
        (m, s, i) for m in ('vanilla', 'yoda') for s in ('0', '1') for i in ('1', '2'))
    assert all(float(r['update_ratio']) == 1.0 for r in rows if r['method'] == 'vanilla')
    assert all(float(r['update_ratio']) < 1.0 for r in rows if r['method'] == 'yoda')
    for metric in ('psnr', 'ssim', 'update_ratio'):
        png = results / f'stability_{metric}.png'
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and f'plot: {png}' in proc.stdout
    assert '| 2 | vanilla | 2 |' in (results / 'summary.md').read_text()

    # An interrupted run (its last state, weights and evaluation lost) resumes; finished runs are kept.
    exp = tmp_path / 'experiments' / 'stab_yoda_b2_s1'
    os.remove(exp / 'training_states' / '2.state')
    os.remove(exp / 'models' / 'net_g_2.pth')
    history = exp / 'validation_tiny_val.csv'
    lines = history.read_text().splitlines()
    history.write_text('\n'.join(lines[:-1]) + '\n')
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('finished earlier, kept') == 3 and 'stab_yoda_b2_s1: resuming' in proc.stdout
    assert (exp / 'training_states' / '2.state').exists()
    with open(results / 'stability.csv', newline='') as f:
        rerun = list(csv.DictReader(f))
    # Bitwise resume: the retrained iteration evaluates exactly as before (wall-clock column aside).
    strip = lambda table: sorted(tuple((k, v) for k, v in r.items() if k != 'sec_per_image') for r in table)  # noqa
    assert strip(rerun) == strip(rows)
