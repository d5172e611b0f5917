"""SR3 (+YODA) end to end through BasicSR's pipelines: train, validate, checkpoint, resume, test, torchrun."""
import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import yaml

from conftest import PYTHON, REPO, run, run_env, tiny_options, train_log, write_options


@pytest.mark.slow
@pytest.mark.parametrize('yoda', [True, False], ids=['yoda', 'vanilla'])
def test_train_validate_checkpoint_and_test(tiny_data, tmp_path, yoda):
    name = f'run_{"yoda" if yoda else "vanilla"}'
    opt_path = write_options(tmp_path / 'train.yml', tiny_options(tiny_data, name=name, yoda=yoda))
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path], cwd=tmp_path)
    exp = tmp_path / 'experiments' / name
    log = train_log(exp)
    assert 'Validation tiny_val' in log and '# psnr' in log and '# ssim' in log
    assert 'sampler ddpm/5' in log  # the init line and the validation line name the sampler
    assert ('mask_ratio' in log) == yoda
    for f in ('net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth'):
        ckpt = torch.load(exp / 'models' / f, map_location='cpu', weights_only=True)
        assert set(ckpt) == {'params', 'params_ema', 'yoda_record'}  # the record: options that rebuild it
        assert ckpt['yoda_record']['network_g'] == tiny_options(tiny_data)['network_g']
        assert ckpt['yoda_record']['yoda']['enabled'] == yoda and ckpt['yoda_record']['format'] == 1
    state = torch.load(exp / 'training_states' / '4.state', map_location='cpu', weights_only=True)
    assert state['iter'] == 4 and state['optimizers'][0]['param_groups'][0]['weight_decay'] == 1e-4
    assert glob.glob(str(exp / 'visualization' / 'val_00' / 'val_00_4.png'))
    # Iteration 4 is validated once: not again after the loop under BasicSR's overrun counter.
    assert log.count('# psnr') == 1 and '@ 4 iter' in log and 'iteration 4 already validated' in log
    assert [os.path.basename(p) for p in glob.glob(str(exp / 'visualization' / 'val_00' / '*.png'))] == ['val_00_4.png']
    assert glob.glob(str(tmp_path / 'tb_logger' / name / 'events.out.tfevents.*'))
    assert not glob.glob(str(exp / '**' / '*.tmp*'), recursive=True), 'temporary checkpoint files left behind'

    test_opt = tiny_options(tiny_data, name=f'test_{name}', yoda=yoda)
    del test_opt['datasets']['train'], test_opt['train'], test_opt['logger']
    test_opt['datasets'] = {'test_1': test_opt['datasets']['val']}
    test_opt['path'] = {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                        'strict_load_g': True}
    test_opt['val'].pop('val_freq')
    test_path = write_options(tmp_path / 'test.yml', test_opt)
    run([PYTHON, '-m', 'yoda_plugin', 'test', '-opt', test_path], cwd=tmp_path)
    results = tmp_path / 'results' / f'test_{name}'
    summary = json.load(open(results / 'summary_tiny_val.json'))
    assert summary['images'] == 2 and summary['yoda']['enabled'] == yoda
    assert summary['sampler'] == {'type': 'ddpm', 'steps': None, 'eta': 0.0} and summary['sample_steps'] == 5
    assert 0 < summary['metrics']['psnr'] < 100 and -1 <= summary['metrics']['ssim'] <= 1
    assert (summary['update_ratio'] < 1.0) == yoda
    rows = open(results / 'metrics_tiny_val.csv').read().splitlines()
    assert rows[0].startswith('image,psnr,ssim,update_ratio') and len(rows) == 3
    assert len(glob.glob(str(results / 'visualization' / 'tiny_val' / '*.png'))) == 2


@pytest.mark.slow
def test_kill_and_auto_resume(tiny_data, tmp_path):
    """SIGKILL a run between checkpoints, restart with --auto_resume: it continues from the last state."""
    opt = tiny_options(tiny_data, name='resume', total_iter=10000, logger__save_checkpoint_freq=2,
                       val__val_freq=100000)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    exp = tmp_path / 'experiments' / 'resume'
    proc = subprocess.Popen([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path], cwd=tmp_path, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (exp / 'training_states' / '4.state').exists():
            assert time.time() < deadline and proc.poll() is None, 'training did not reach iteration 4'
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = sorted(int(os.path.basename(p).split('.')[0]) for p in glob.glob(str(exp / 'training_states' / '*.state')))
    last = states[-1]
    assert last >= 4
    opt['train']['total_iter'] = last + 2
    write_options(opt_path, opt)
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', opt_path, '--auto_resume'], cwd=tmp_path)
    log = train_log(exp)
    assert 'Resuming training from epoch' in log and f'iter: {last}.' in log
    assert f"net_g_{last}.pth, with param key: [params]" in log
    assert f"net_g_{last}.pth, with param key: [params_ema]" in log  # EMA restored, not re-copied
    assert (exp / 'training_states' / f'{last + 2}.state').exists()
    state = torch.load(exp / 'training_states' / f'{last + 2}.state', weights_only=True)
    assert state['iter'] == last + 2
    assert state['optimizers'][0]['state'], 'optimizer moments restored and updated'


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stay_in_sync(tiny_data, tmp_path):
    # BasicSR ends training after its computed epochs; enlarge the tiny set so 4 iterations happen.
    opt = tiny_options(tiny_data, name='dist', total_iter=4, logger__save_checkpoint_freq=2,
                       datasets__train__dataset_enlarge_ratio=8, val__tb_images=2)
    opt_path = write_options(tmp_path / 'train.yml', opt)
    run([PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(REPO, 'yoda_plugin', 'train.py'), '-opt', opt_path, '--launcher', 'pytorch'], cwd=tmp_path,
        timeout=400)
    log = train_log(tmp_path / 'experiments' / 'dist')
    assert 'World size (gpu number): 2' in log
    assert re.search(r'Ranks in sync at iteration 2:[^\n]* 2 ranks', log), log
    assert 'Ranks in sync at iteration 4' in log
    assert 'Ranks in sync at iteration 4 (final save, latest)' in log  # BasicSR passes -1 to the final save
    assert 'Ranks in sync at iteration -1' not in log
    assert 'Validation tiny_val' in log
    assert log.count('# psnr') == 1 and '@ 4 iter' in log and '@ 5 iter' not in log and '@ 6 iter' not in log
    # Rank 1 sampled the second validation image; rank 0 (the only tensorboard writer) logs it too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / 'tb_logger' / 'dist'), size_guidance={'images': 0})
    events.Reload()
    assert sorted(events.Tags()['images']) == ['images/tiny_val/val_00', 'images/tiny_val/val_01']
    assert [e.step for e in events.Images('images/tiny_val/val_01')] == [4]


@pytest.mark.slow
def test_last_iteration_off_the_validation_grid_is_validated_under_its_number(tiny_data, tmp_path):
    opt = tiny_options(tiny_data, name='offgrid', total_iter=3, val__val_freq=2, logger__save_checkpoint_freq=100)
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', write_options(tmp_path / 'train.yml', opt)], cwd=tmp_path)
    exp = tmp_path / 'experiments' / 'offgrid'
    log = train_log(exp)
    assert log.count('# psnr') == 2 and 'already validated' not in log
    images = sorted(os.path.basename(p) for p in glob.glob(str(exp / 'visualization' / 'val_00' / '*.png')))
    assert images == ['val_00_2.png', 'val_00_3.png']


@pytest.mark.slow
def test_basicsr_loader_imports_plugin_from_option_file(tmp_path):
    """BasicSR's runners parse options with PyYAML's full Loader: our option line imports the plugin."""
    code = ('import yaml, sys\n'
            'opt = yaml.load(open(sys.argv[1]), Loader=yaml.Loader)\n'
            'from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY\n'
            'assert "SR3UNet" in ARCH_REGISTRY and "SR3Model" in MODEL_REGISTRY\n'
            'assert "YODAPairedDataset" in DATASET_REGISTRY and "MaskedNoiseLoss" in LOSS_REGISTRY\n'
            'print(opt["yoda_plugin"])\n')
    for f in ('train_sr3_yoda.yml', 'train_sr3.yml', 'test_sr3_yoda.yml', 'test_sr3.yml'):
        proc = run([PYTHON, '-c', code, os.path.join(REPO, 'options', f)], cwd=tmp_path)
        import yoda_plugin
        assert proc.stdout.strip() == yoda_plugin.__version__


def test_safe_loader_refuses_foreign_python_tags(tmp_path):
    from yoda_plugin.utils.options import load_options
    bad = tmp_path / 'bad.yml'
    bad.write_text('x: !!python/name:os.system\n')
    with pytest.raises(ValueError, match='refusing tag'):
        load_options(str(bad))
    bad.write_text('x: !!python/object/apply:os.system ["true"]\n')
    with pytest.raises(ValueError, match='cannot parse'):
        load_options(str(bad))
    opt = load_options(os.path.join(REPO, 'options', 'train_sr3_yoda.yml'))
    assert opt['yoda']['lower_bound'] == 0.4 and opt['train']['optim_g']['lr'] == 5e-5
    with open(os.path.join(REPO, 'options', 'train_sr3_yoda.yml')) as f:
        assert yaml.load(f, Loader=yaml.Loader)['diffusion']['num_timesteps'] == 500


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_data, tmp_path):
    """N iterations in one go == N/2, stop, --auto_resume to N: bitwise equal weights, EMA and optimizer (CPU)."""
    def opt_for(name, total):
        # 6 images, batch 2: 3 iterations per epoch, so the stop at 4 falls mid-epoch.
        return tiny_options(tiny_data, name=name, total_iter=total, logger__save_checkpoint_freq=4,
                            val__val_freq=10**6)
    straight = write_options(tmp_path / 'straight.yml', opt_for('straight', 8))
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', straight], cwd=tmp_path)
    part = tmp_path / 'resumed.yml'
    write_options(part, opt_for('resumed', 4))
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', str(part)], cwd=tmp_path)
    write_options(part, opt_for('resumed', 8))
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', str(part), '--auto_resume'], cwd=tmp_path)
    a = torch.load(tmp_path / 'experiments' / 'straight' / 'models' / 'net_g_8.pth', weights_only=True)
    b = torch.load(tmp_path / 'experiments' / 'resumed' / 'models' / 'net_g_8.pth', weights_only=True)
    for key in ('params', 'params_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name} differs after resume'
    sa = torch.load(tmp_path / 'experiments' / 'straight' / 'training_states' / '8.state', weights_only=True)
    sb = torch.load(tmp_path / 'experiments' / 'resumed' / 'training_states' / '8.state', weights_only=True)
    for i, st in sa['optimizers'][0]['state'].items():
        assert torch.equal(st['exp_avg'], sb['optimizers'][0]['state'][i]['exp_avg'])


@pytest.mark.slow
def test_distributed_test_splits_images_and_equals_single_process(tiny_data, tmp_path):
    """torchrun testing: ranks share the images, rank 0 gathers; per-image metrics equal one process."""
    opt = tiny_options(tiny_data, name='pre', total_iter=1, logger__save_checkpoint_freq=100, val__val_freq=100)
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', write_options(tmp_path / 'pre.yml', opt)], cwd=tmp_path)
    test_opt = tiny_options(tiny_data, name='single', yoda=True)
    for key in ('train', 'logger'):
        test_opt.pop(key)
    test_opt['datasets'] = {'test_1': test_opt['datasets']['val']}
    test_opt['path'] = {'pretrain_network_g': str(tmp_path / 'experiments' / 'pre' / 'models' / 'net_g_latest.pth')}
    test_opt['val'].pop('val_freq')
    run([PYTHON, '-m', 'yoda_plugin', 'test', '-opt', write_options(tmp_path / 'single.yml', test_opt)], cwd=tmp_path)
    test_opt['name'] = 'dual'
    run([PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(REPO, 'yoda_plugin', 'test.py'), '-opt', write_options(tmp_path / 'dual.yml', test_opt),
         '--launcher', 'pytorch'], cwd=tmp_path, timeout=300)
    single = open(tmp_path / 'results' / 'single' / 'metrics_tiny_val.csv').read().splitlines()
    dual = open(tmp_path / 'results' / 'dual' / 'metrics_tiny_val.csv').read().splitlines()
    strip = lambda rows: [','.join(r.split(',')[:-1]) for r in rows]  # drop the timing column
    assert strip(single) == strip(dual) and len(single) == 3
    s = json.load(open(tmp_path / 'results' / 'single' / 'summary_tiny_val.json'))
    d = json.load(open(tmp_path / 'results' / 'dual' / 'summary_tiny_val.json'))
    assert s['metrics'] == d['metrics'] and s['update_ratio'] == d['update_ratio']
    log = open(glob.glob(str(tmp_path / 'results' / 'dual' / '*.log'))[0]).read()
    assert '2 ranks' in log
