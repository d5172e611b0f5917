"""Every option file under options/ (recursively) parses, builds and passes the runners' option check.

For each file: the safe loader parses it; the whole-tree check our runners run after
BasicSR's ``parse_options`` (:func:`yoda_plugin.runner.option_check.check_option_tree`:
known keys of every section, required keys and types, registered types, metric
options against their functions' parameters, attention_meta against its source's
parameters, our models' sections) passes on the tree ``parse_options`` makes of it;
every ``network_*`` is built at full size on the ``meta`` device (no memory, exact
configuration) and the model class of ``model_type`` is built on CPU with tiny
networks (``is_train`` and a temporary ``path`` section as BasicSR's
``parse_options`` makes them, no pretrained weights); every dataset section is
constructed by its registered class inside an empty directory, so the only
acceptable failure is the missing data (FileNotFoundError) and bad values fail.
Generic over model types: SRDiff option files are covered the same way. A model
class may declare extra allowed keys with a class attribute
``extra_option_keys = {'': {...}, 'train': {...}}`` (merged along its bases); the
known keys live in the library (option_check), not here.
"""
import copy
import glob
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, assert_mentions, run_env

import yoda_plugin  # noqa: F401
from yoda_plugin.runner.option_check import check_option_tree, model_extra_keys, unknown_keys
from yoda_plugin.utils.options import load_options

OPTION_FILES = sorted(glob.glob(os.path.join(REPO, 'options', '**', '*.yml'), recursive=True))

# Shrink known architectures for the CPU model build (the full size is checked on the meta device).
TINY_NETWORKS = {'SR3UNet': {'base_channels': 16, 'norm_groups': 8, 'num_res_blocks': 1}}


def _rel(path):
    return os.path.relpath(path, REPO)


def _basicsr_like(opt, is_train, root):
    """What basicsr.utils.options.parse_options adds (CPU, not distributed), with paths under ``root``."""
    opt = copy.deepcopy(opt)
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, auto_resume=False, num_gpu=0, root_path=root)
    for phase, ds in opt['datasets'].items():
        ds['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            ds['scale'] = opt['scale']
    path = opt.setdefault('path', {})
    if is_train:
        exp = os.path.join(root, 'experiments', opt['name'])
        path.update(experiments_root=exp, models=os.path.join(exp, 'models'), log=exp,
                    training_states=os.path.join(exp, 'training_states'),
                    visualization=os.path.join(exp, 'visualization'))
    else:
        res = os.path.join(root, 'results', opt['name'])
        path.update(results_root=res, log=res, visualization=os.path.join(res, 'visualization'))
    return opt


def test_option_files_found():
    names = {_rel(p) for p in OPTION_FILES}
    for scenario in ('', '_64_256', '_64_512'):
        for kind in ('train', 'test'):
            for yoda in ('sr3', 'sr3_yoda'):
                assert f'options/{kind}_{yoda}{scenario}.yml' in names
    assert sum(n.startswith('options/ablation/train_') for n in names) == 19
    assert sum(n.startswith('options/ablation/test_') for n in names) == 19


@pytest.mark.slow
def test_ablation_options_are_up_to_date():
    proc = subprocess.run([PYTHON, os.path.join(REPO, 'scripts', 'make_ablation_options.py'), '--check'],
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('path', OPTION_FILES, ids=_rel)
def test_option_file_builds(path, tmp_path, monkeypatch):
    # Models check at set-up that LPIPS's AlexNet file exists (it is loaded only when scoring).
    placeholder = tmp_path / 'alexnet-owt-7be5be79.pth'
    placeholder.write_bytes(b'')
    monkeypatch.setenv('YODA_LPIPS_ALEXNET', str(placeholder))
    check_option_file(path, tmp_path)


def check_option_file(path, tmp_path):
    """All checks of the module docstring; raises AssertionError or the builders' errors."""
    from basicsr.models import build_model
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
    opt = load_options(path)
    assert opt.get('yoda_plugin') == yoda_plugin.__version__, 'the plugin-import line is missing'
    for key in ('name', 'model_type', 'datasets', 'network_g'):
        assert key in opt, f'{key} is missing'
    assert opt['model_type'] in MODEL_REGISTRY, f'unknown model_type {opt["model_type"]}'
    is_train = 'train' in opt
    # The runners' whole-tree check (yoda_plugin/runner/option_check.py) on the tree BasicSR's parse_options makes.
    check_option_tree(_basicsr_like(opt, is_train, str(tmp_path / 'root')), is_train, _rel(path), cuda_devices=0)

    phases = {p.split('_')[0] for p in opt['datasets']}
    if is_train:
        assert 'train' in phases, 'a train section without a train dataset'
        assert os.path.basename(path).startswith('train'), 'training options should be named train_*'
    else:
        assert phases <= {'test', 'val'}, f'test options with dataset phases {phases}'
    if not is_train:
        for key, value in opt['path'].items():
            if key.startswith('param_key_'):
                assert value in ('params', 'params_ema'), f'path.{key} = {value!r}'

    # Networks at full size on the meta device: the exact configuration, no memory.
    for key, net_opt in opt.items():
        if key.startswith('network_'):
            assert net_opt.get('type') in ARCH_REGISTRY, f'{key}.type {net_opt.get("type")!r} is not registered'
            from basicsr.archs import build_network
            with torch.device('meta'):
                net = build_network(copy.deepcopy(net_opt))
            assert sum(p.numel() for p in net.parameters()) > 0

    # Model on CPU with tiny networks and no pretrained weights.
    root = str(tmp_path / 'root')
    mopt = _basicsr_like(opt, is_train, root)
    for key in list(mopt):
        if key.startswith('network_') and mopt[key].get('type') in TINY_NETWORKS:
            mopt[key].update(TINY_NETWORKS[mopt[key]['type']])
    for key in list(mopt['path']):
        if key.startswith('pretrain_network_') or key == 'resume_state':
            mopt['path'][key] = None
    model = build_model(mopt)
    assert model.device.type == 'cpu'
    if is_train:
        assert model.optimizers and model.schedulers

    # Datasets: constructed where no data exist, so only FileNotFoundError is acceptable.
    empty = tmp_path / 'empty'
    empty.mkdir()
    cwd = os.getcwd()
    os.chdir(empty)
    try:
        _check_datasets(mopt)
    finally:
        os.chdir(cwd)


def _check_datasets(mopt):
    from basicsr.data import build_dataset
    from basicsr.utils.registry import DATASET_REGISTRY
    for phase, ds in mopt['datasets'].items():
        where = f'datasets.{phase}'
        assert ds.get('type') in DATASET_REGISTRY, f'{where}.type {ds.get("type")!r} is not registered'
        assert not any(os.path.isabs(str(ds.get(k, ''))) for k in ds if k.startswith('dataroot')), \
            f'{where}: absolute data paths are not portable'
        with pytest.raises(FileNotFoundError):
            build_dataset(copy.deepcopy(ds))


@pytest.mark.parametrize('edit, error', [
    (('diffusion:', 'diffusio:'), ('diffusio ', 'diffusion?')),                                   # top-level typo
    (('    dataroot_attention:', '    dataroot_attentoin:'),
     ('datasets.train.dataroot_attentoin', 'datasets.train.dataroot_attention?')),
    (('  lower_bound: 0.4', '  lower_bund: 0.4'), ('yoda.lower_bund', 'yoda.lower_bound?')),
    (('  norm_groups: 32', '  norm_groups: 7'), 'norm_groups'),                                    # network value
    (('    psnr: {type: calculate_psnr,', '    psnr: {type: calculate_psnr, weight: 1,'),
     'unknown key val.metrics.psnr.weight'),
    (('  print_freq: 200', '  print_frq: 200'), ('logger.print_frq', 'logger.print_freq?')),
], ids=['top', 'dataset', 'yoda', 'network', 'metric', 'logger'])
def test_checks_catch_mistakes(tmp_path, edit, error):
    """The checks are not vacuous: one typo in a copy of the main option file fails them."""
    text = open(os.path.join(REPO, 'options', 'train_sr3_yoda.yml'), encoding='utf-8').read()
    assert edit[0] in text
    bad = tmp_path / 'train_bad.yml'
    bad.write_text(text.replace(edit[0], edit[1], 1), encoding='utf-8')
    with pytest.raises((AssertionError, ValueError)) as info:
        check_option_file(str(bad), tmp_path)
    assert_mentions(str(info.value), *((error,) if isinstance(error, str) else error))


def test_model_specific_keys_are_known_along_the_class_hierarchy():
    sr3 = model_extra_keys('SR3Model')
    assert {'amp', 'nan_policy', 'nan_skip_limit'} <= sr3['train'] and 'trust_checkpoint' in sr3['path']
    srdiff = model_extra_keys('SRDiffModel')
    assert {'amp', 'freeze_rrdb'} <= srdiff['train'] and 'srdiff' in srdiff['']
    opt = {'name': 'x', 'train': {'amp': 'bf16', 'amp_typo': 1}, 'path': {'trust_checkpoint': False}}
    assert unknown_keys(opt, sr3) == ['unknown key train.amp_typo']
    assert unknown_keys(opt, srdiff) == unknown_keys(opt, sr3)
