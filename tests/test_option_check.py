"""The runners' whole-tree option check (yoda_plugin/runner/option_check.py), one test per refused case.

Each bad option file is refused with a message naming the file and the key (and the closest known key or the
expected type), exit code 2, and nothing is created on disk. Most cases run in-process through BasicSR's real
``parse_options`` wrapped by our check (as ``basicsr.train`` / ``basicsr.test`` have it in our runners; BasicSR's
seeding is stubbed so the test session's RNGs are untouched); a few run ``yoda_plugin/train.py`` / ``test.py``
(or ``python -m yoda_plugin``) as subprocesses. No data are needed: the check runs before any is read.
"""
import os
import subprocess
import sys

import pytest
import yaml

from conftest import PYTHON, REPO, assert_mentions, mentions, run_env, tiny_options, write_options

from yoda_plugin.runner.option_check import OptionError, check_option_tree
from yoda_plugin.runner.patches import USAGE_EXIT_CODE, checked_parse_options
from yoda_plugin.utils.options import SafeOptionLoader, load_options

DATA = os.path.join('nonexistent', 'data')  # never read: the check comes first


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs)


def _write(tmp_path, text, name='train_bad.yml'):
    path = tmp_path / name
    path.write_text(text, encoding='utf-8')
    return str(path)


def _options_text(tmp_path, train=True, **overrides):
    opt = tiny_options(DATA, name='bad', **overrides)
    if not train:
        del opt['train'], opt['logger'], opt['datasets']['train']
        opt['datasets'] = {'test_1': opt['datasets']['val']}
        opt['val'].pop('val_freq')
    write_options(tmp_path / 'scratch.yml', opt)
    text = (tmp_path / 'scratch.yml').read_text(encoding='utf-8')
    (tmp_path / 'scratch.yml').unlink()
    return text


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """``refused(path, *args, is_train=True)``: run the checked ``parse_options`` as our runners do; it must exit 2
    with nothing created; returns the stderr line."""
    import basicsr.utils.options as bopt
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bopt, 'ordered_yaml', lambda: (SafeOptionLoader, yaml.SafeDumper))
    monkeypatch.setattr(bopt, 'set_random_seed', lambda seed: None)

    def run(path, *args, is_train=True, ok=False):
        monkeypatch.setattr(sys, 'argv', ['train.py' if is_train else 'test.py', '-opt', path, *args])
        before = _tree(tmp_path)
        parse = checked_parse_options(bopt.parse_options)
        if ok:
            return parse(str(tmp_path), is_train=is_train)[0]
        with pytest.raises(SystemExit) as info:
            parse(str(tmp_path), is_train=is_train)
        assert info.value.code == 2
        assert _tree(tmp_path) == before, 'something was created'
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
        return err

    return run


def _run_runner(tmp_path, args):
    before = _tree(tmp_path)
    proc = subprocess.run([PYTHON, *args], cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert _tree(tmp_path) == before, 'the runner created files'
    return proc.stderr.strip().splitlines()[-1]


# -- the refused cases --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_top_level_list_is_refused_by_the_training_runner(tmp_path):
    path = _write(tmp_path, '- name: x\n- num_gpu: 0\n')
    err = _run_runner(tmp_path, [os.path.join(REPO, 'yoda_plugin', 'train.py'), '-opt', path])
    assert err == f'error: option file {path} must contain a mapping at top level, got list'


@pytest.mark.slow
def test_empty_file_is_refused_by_the_test_runner(tmp_path):
    path = _write(tmp_path, '# nothing but a comment\n', 'test_empty.yml')
    err = _run_runner(tmp_path, [os.path.join(REPO, 'yoda_plugin', 'test.py'), '-opt', path])
    assert_mentions(err, path, 'empty', 'mapping')


def test_typo_of_manual_seed_names_the_closest_key(tmp_path, refused):
    path = _write(tmp_path, _options_text(tmp_path).replace('\nmanual_seed: 0\n', '\nmanual_sed: 0\n'))
    err = refused(path)
    assert_mentions(err, path, 'manual_sed', 'manual_seed?')


def test_typo_of_ema_decay_names_the_closest_key(tmp_path, refused):
    path = _write(tmp_path, _options_text(tmp_path).replace('  ema_decay: 0.9\n', '  ema_dcay: 0.9\n'))
    assert_mentions(refused(path), 'train.ema_dcay', 'train.ema_decay?')


def test_missing_total_iter_is_named(tmp_path, refused):
    text = _options_text(tmp_path)
    assert '  total_iter: 4\n' in text
    err = refused(_write(tmp_path, text.replace('  total_iter: 4\n', '')))
    assert_mentions(err, 'missing key train.total_iter')
    assert "KeyError" not in err


def test_missing_save_checkpoint_freq_is_named(tmp_path, refused):
    text = _options_text(tmp_path)
    err = refused(_write(tmp_path, text.replace('  save_checkpoint_freq: 2\n', '')))
    assert 'missing key logger.save_checkpoint_freq' in err


def test_empty_yoda_section_is_refused_not_vanilla(tmp_path, refused):
    text = _options_text(tmp_path)
    start = text.index('\nyoda:\n') + 1
    end = text.index('\npath:\n') + 1
    err = refused(_write(tmp_path, text[:start] + 'yoda:\n' + text[end:]))
    assert_mentions(err, 'yoda', 'empty', 'yoda: {enabled: false}')


def test_duplicate_key_names_its_path_and_both_lines(tmp_path, refused):
    text = _options_text(tmp_path)
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line == '  ema_decay: 0.9\n')
    lines.insert(first + 1, '  ema_decay: 0.5\n')
    path = _write(tmp_path, ''.join(lines))
    err = refused(path)
    assert_mentions(err, 'duplicate key train.ema_decay', f'{first + 1} and {first + 2}', path)
    with pytest.raises(ValueError, match=mentions('duplicate key train.ema_decay')):
        load_options(path)  # the loader itself refuses it: every user of load_options


@pytest.mark.slow
def test_force_yml_with_a_mapping_value_names_the_entry(tmp_path):
    path = _write(tmp_path, _options_text(tmp_path))
    err = _run_runner(tmp_path, ['-m', 'yoda_plugin', 'train', '-opt', path,
                                 '--force_yml', 'train:optim_g={type:Adam}'])
    assert "--force_yml entry 'train:optim_g={type:Adam}'" in err and 'not a mapping' in err
    assert 'dictionary update sequence' not in err


def test_force_yml_misspelt_keys_name_the_entry(tmp_path, refused):
    path = _write(tmp_path, _options_text(tmp_path))
    err = refused(path, '--force_yml', 'trian:total_iter=3')
    assert_mentions(err, 'trian', 'train?')
    err = refused(path, '--force_yml', 'train:ema_dcay=0.5')
    assert_mentions(err, 'train.ema_dcay', 'train.ema_decay?', "--force_yml 'train:ema_dcay=0.5'")
    assert 'expected exactly one "="' in refused(path, '--force_yml', 'train:total_iter=3=4')
    # a good entry goes through, as BasicSR applies it
    assert refused(path, '--force_yml', 'train:total_iter=3', ok=True)['train']['total_iter'] == 3


def test_num_gpu_without_cuda_suggests_zero_or_auto(tmp_path, refused, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    path = _write(tmp_path, _options_text(tmp_path).replace('\nnum_gpu: auto\n', '\nnum_gpu: 1\n'))
    err = refused(path)
    assert_mentions(err, 'num_gpu is 1', 'CUDA', 'num_gpu: 0', 'num_gpu: auto')
    # auto is BasicSR's torch.cuda.device_count(): 0 on this machine, which works
    ok = refused(_write(tmp_path, _options_text(tmp_path), 'train_auto.yml'), ok=True)
    assert ok['num_gpu'] == 0


@pytest.mark.slow
def test_num_gpu_beyond_the_visible_devices_is_refused_by_the_runner(tmp_path):
    path = _write(tmp_path, _options_text(tmp_path).replace('\nnum_gpu: auto\n', '\nnum_gpu: 99\n'))
    err = _run_runner(tmp_path, [os.path.join(REPO, 'yoda_plugin', 'train.py'), '-opt', path])
    assert 'num_gpu is 99 but' in err and 'num_gpu: auto' in err


def test_yoda_with_basicsr_paired_dataset_names_type_and_our_dataset(tmp_path, refused):
    text = _options_text(tmp_path)
    assert text.count('  type: YODAPairedDataset\n') == 2
    path = _write(tmp_path, text.replace('  type: YODAPairedDataset\n', '  type: PairedImageDataset\n', 1))
    err = refused(path)
    assert_mentions(err, 'datasets.train.type is PairedImageDataset', 'attention maps', 'YODA',
                    'type: YODAPairedDataset', 'dataroot_attention')
    assert 'set dataroot_attention in the dataset options' not in err


def test_yoda_without_dataroot_attention_names_the_key(tmp_path, refused):
    opt = tiny_options(DATA, name='bad')
    del opt['datasets']['val']['dataroot_attention'], opt['datasets']['val']['attention_meta']
    err = refused(write_options(tmp_path / 'train_noatt.yml', opt))
    assert_mentions(err, 'missing key datasets.val.dataroot_attention', 'YODA')


# -- types, test mode, and what must keep passing ---------------------------------------------------------------
def test_wrong_types_are_named_with_the_expected_type(tmp_path, refused):
    text = _options_text(tmp_path)
    err = refused(_write(tmp_path, text.replace('  total_iter: 4\n', "  total_iter: '4'\n")))
    assert_mentions(err, 'train.total_iter', 'whole number >= 1', "'4'")
    err = refused(_write(tmp_path, text.replace('  save_img: true\n', '  save_img: 1\n'), 'train_b.yml'))
    assert_mentions(err, 'val.save_img', 'true or false', 'got 1')
    err = refused(_write(tmp_path, text.replace('type: SR3UNet', 'type: SR3Unet'), 'train_c.yml'))
    assert_mentions(err, "network_g.type: 'SR3Unet'", 'architecture', 'SR3UNet?')


def test_test_options_are_checked_in_test_mode(tmp_path, refused):
    text = _options_text(tmp_path, train=False)
    assert refused(_write(tmp_path, text, 'test_ok.yml'), is_train=False, ok=True)['is_train'] is False
    err = refused(_write(tmp_path, text.replace('  save_img: true\n', ''), 'test_bad.yml'), is_train=False)
    assert 'missing key val.save_img' in err
    err = refused(_write(tmp_path, text.replace('  sample_seed: 0\n', '  sample_sed: 0\n'), 'test_typo.yml'),
                  is_train=False)
    assert_mentions(err, 'val.sample_sed', 'val.sample_seed?')


def test_library_check_reports_every_problem_in_one_error():
    opt = tiny_options(DATA, name='lib')
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False, num_gpu=0, manual_sed=1)
    opt['train']['ema_dcay'] = opt['train'].pop('ema_decay')
    for phase, ds in opt['datasets'].items():
        ds.update(phase=phase, scale=opt['scale'])
    with pytest.raises(OptionError) as info:
        check_option_tree(opt, True, 'x.yml', cuda_devices=0)
    message = str(info.value)
    assert message.startswith('option file x.yml: '), message
    assert_mentions(message, 'manual_sed', 'manual_seed?', 'train.ema_dcay', 'train.ema_decay?')
    assert isinstance(info.value, ValueError) and USAGE_EXIT_CODE == 2


# -- keyword sections against the signature of what they build ----------------------------------------------------
@pytest.mark.parametrize('old, new, named', [
    ('  norm_groups: 8\n', '  norm_group: 8\n', ('network_g.norm_group ', 'network_g.norm_groups?')),
    ('    weight_decay: 0.0001\n', '    weight_decy: 0.0001\n',
     ('train.optim_g.weight_decy', 'train.optim_g.weight_decay?')),
    ('    type: AdamW\n', '    type: Adamw\n', ("train.optim_g.type: 'Adamw'", 'torch.optim', 'AdamW?')),
    ('    gamma: 1.0\n', '    gama: 1.0\n', ('train.scheduler.gama', 'train.scheduler.gamma?')),
    ('    milestones:\n    - 100000\n', '', ('missing key train.scheduler.milestones', 'MultiStepRestartLR')),
    ('    loss_weight: 1.0\n', '    loss_weigth: 1.0\n',
     ('train.pixel_opt.loss_weigth', 'train.pixel_opt.loss_weight?')),
    ('    type: MaskedNoiseLoss\n', '    type: MaskedNoiseLos\n', ("train.pixel_opt.type: 'MaskedNoiseLos'", 'loss')),
    ('      crop_border: 0\n      test_y_channel: false\n    ssim:', '      test_y_channel: false\n    ssim:',
     ('missing key val.metrics.psnr.crop_border', 'calculate_psnr')),
], ids=['arch', 'optimizer', 'optimizer-type', 'scheduler', 'scheduler-required', 'loss', 'loss-type', 'metric'])
def test_keyword_typos_get_the_closest_keyword_not_a_type_error(tmp_path, refused, old, new, named):
    text = _options_text(tmp_path)
    assert old in text
    err = refused(_write(tmp_path, text.replace(old, new, 1)))
    assert_mentions(err, *named)
    assert 'TypeError' not in err and 'unexpected keyword' not in err


@pytest.mark.slow
def test_sampler_steps_beyond_the_schedule_are_refused_by_the_test_runner(tmp_path):
    text = _options_text(tmp_path, train=False)
    assert '  sample_seed: 0\n' in text
    path = _write(tmp_path, text.replace('  sample_seed: 0\n', '  sample_seed: 0\n  sampler:\n    type: ddim\n'
                                                              '    steps: 500\n'), 'test_steps.yml')
    err = _run_runner(tmp_path, [os.path.join(REPO, 'yoda_plugin', 'test.py'), '-opt', path])
    assert err.startswith(f'error: option file {path}: ') and 'val.sampler.steps' in err
    assert 'num_timesteps=100' in err and '500' in err


@pytest.mark.slow
def test_a_typo_in_network_g_leaves_the_experiment_folder_alone(tmp_path):
    exp = tmp_path / 'experiments' / 'bad'
    exp.mkdir(parents=True)
    (exp / 'train_bad.yml').write_text('the earlier run\n')
    path = _write(tmp_path, _options_text(tmp_path).replace('  norm_groups: 8\n', '  norm_group: 8\n'))
    err = _run_runner(tmp_path, ['-m', 'yoda_plugin', 'train', '-opt', path])  # the tree must not change
    assert_mentions(err, 'network_g.norm_group ', 'network_g.norm_groups?')
    assert (exp / 'train_bad.yml').read_text() == 'the earlier run\n'


# -- the safe loader -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tag, why', [('yoda_plugin.os.system', ('yoda_plugin.os ', 'module')),
                                      ('os.system', ('os ', 'yoda_plugin')),
                                      ('yoda_plugin.nothing', ("'nothing'",))])
def test_refused_python_name_tag_says_refused_and_why(tmp_path, tag, why):
    path = _write(tmp_path, f'yoda_plugin: !!python/name:{tag}\n' + _options_text(tmp_path).split('\n', 1)[1])
    with pytest.raises(ValueError) as info:
        load_options(path)
    assert_mentions(str(info.value), f'!!python/name:{tag}', *why, path)


@pytest.mark.slow
def test_refused_python_name_tag_is_one_line_from_the_runner(tmp_path):
    tag = 'yoda_plugin.os.system'
    path = _write(tmp_path, f'yoda_plugin: !!python/name:{tag}\n' + _options_text(tmp_path).split('\n', 1)[1])
    err = _run_runner(tmp_path, [os.path.join(REPO, 'yoda_plugin', 'train.py'), '-opt', path])
    assert f'refusing tag !!python/name:{tag}' in err and 'ModuleNotFoundError' not in err
