"""Every option file under options/ (recursively) parses, builds and has no unknown key.

For each file: the safe loader parses it; the top-level, ``path``, ``train`` and
``logger`` keys are known ones; every ``network_*`` is built at full size on
the ``meta`` device (no memory, exact configuration) and the model class of
``model_type`` is built on CPU with tiny networks (``is_train`` and a temporary
``path`` section as BasicSR's ``parse_options`` makes them, no pretrained
weights); every dataset section is constructed by its registered class inside
an empty directory, so the only acceptable failure is the missing data
(FileNotFoundError) and unknown keys or bad values fail; metric options are
checked against their functions' parameters; attention_meta names a registered
attention source with its own parameters. Generic over model types: SRDiff
option files are covered the same way. A model class may declare extra allowed
keys with a class attribute ``extra_option_keys = {'': {...}, 'train': {...}}``.
"""
import copy
import glob
import inspect
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, run_env

import yoda_plugin  # noqa: F401
from yoda_plugin.utils.options import load_options

OPTION_FILES = sorted(glob.glob(os.path.join(REPO, 'options', '**', '*.yml'), recursive=True))

BASICSR_TOP_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val', 'logger',
    'dist_params', 'find_unused_parameters', 'use_static_graph', 'is_train', 'dist', 'rank', 'world_size',
    'auto_resume', 'root_path'
}
PLUGIN_TOP_KEYS = {'yoda_plugin', 'diffusion', 'yoda'}
PATH_KEYS = {'resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states', 'log',
             'visualization', 'results_root'}
PATH_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
TRAIN_KEYS = {'ema_decay', 'total_iter', 'warmup_iter', 'scheduler', 'net_d_iters', 'net_d_init_iters', 'nan_policy'}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}

# Sections/keys that model classes read beyond BasicSR's and SR3Model's (a class may instead declare them
# itself as ``extra_option_keys``; both are merged).
MODEL_EXTRA_KEYS = {'SRDiffModel': {'': {'srdiff'}, 'train': {'freeze_rrdb'}}}

# Shrink known architectures for the CPU model build (the full size is checked on the meta device).
TINY_NETWORKS = {'SR3UNet': {'base_channels': 16, 'norm_groups': 8, 'num_res_blocks': 1}}


def _rel(path):
    return os.path.relpath(path, REPO)


def _model_extra_keys(model_type):
    from basicsr.utils.registry import MODEL_REGISTRY
    cls = MODEL_REGISTRY.get(model_type)
    extra = {}
    for klass in cls.__mro__:  # a subclass adds to what its bases read
        for section, keys in (vars(klass).get('extra_option_keys') or {}).items():
            extra[section] = extra.get(section, set()) | set(keys)
    for section, keys in MODEL_EXTRA_KEYS.get(model_type, {}).items():
        extra[section] = extra.get(section, set()) | set(keys)
    return extra


def _unknown_keys(opt, extra):
    bad = []
    for key in opt:
        if key not in BASICSR_TOP_KEYS | PLUGIN_TOP_KEYS | set(extra.get('', ())) and not key.startswith('network_'):
            bad.append(key)
    for key in opt.get('path') or {}:
        if key not in PATH_KEYS | set(extra.get('path', ())) and not key.startswith(PATH_PREFIXES):
            bad.append(f'path.{key}')
    for key in opt.get('train') or {}:
        if key not in TRAIN_KEYS | set(extra.get('train', ())) and not key.startswith('optim_') \
                and not key.endswith('_opt'):
            bad.append(f'train.{key}')
    for key in opt.get('logger') or {}:
        if key not in LOGGER_KEYS | set(extra.get('logger', ())):
            bad.append(f'logger.{key}')
    return bad


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


def _check_metrics(opt):
    from basicsr.utils.registry import METRIC_REGISTRY
    for name, mopt in ((opt.get('val') or {}).get('metrics') or {}).items():
        assert 'type' in mopt, f'val.metrics.{name} has no type'
        assert mopt['type'] in METRIC_REGISTRY, f'val.metrics.{name}: unknown metric type {mopt["type"]!r}'
        params = inspect.signature(METRIC_REGISTRY.get(mopt['type'])).parameters
        named = {p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
        unknown = sorted(set(mopt) - {'type'} - named)
        assert not unknown, f'val.metrics.{name}: unknown option(s) {unknown} for {mopt["type"]}'


def _check_attention_meta(ds, where):
    from yoda_plugin.attention import ATTENTION_SOURCES, _init_parameters
    meta = ds.get('attention_meta')
    if not meta:
        return
    source = dict(meta.get('source') or {})
    assert set(meta) <= {'source', 'grid', 'size', 'scale', 'resize', 'format', 'encoding'}, \
        f'{where}.attention_meta has unknown field(s) {sorted(meta)}'
    assert source.get('name') in ATTENTION_SOURCES, \
        f'{where}.attention_meta.source.name {source.get("name")!r} is no registered attention source'
    accepted = {p.name for p in _init_parameters(ATTENTION_SOURCES[source['name']])}
    unknown = sorted(set(source) - {'name'} - accepted)
    assert not unknown, f'{where}.attention_meta.source: {unknown} are no parameters of {source["name"]}'


def test_option_files_found():
    names = {_rel(p) for p in OPTION_FILES}
    for scenario in ('', '_64_256', '_64_512'):
        for kind in ('train', 'test'):
            for yoda in ('sr3', 'sr3_yoda'):
                assert f'options/{kind}_{yoda}{scenario}.yml' in names
    assert sum(n.startswith('options/ablation/train_') for n in names) == 19
    assert sum(n.startswith('options/ablation/test_') for n in names) == 19


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
    bad = _unknown_keys(opt, _model_extra_keys(opt['model_type']))
    assert not bad, f'unknown option key(s): {bad}'

    is_train = 'train' in opt
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
    _check_metrics(opt)

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
        module = inspect.getmodule(DATASET_REGISTRY.get(ds['type']))
        known = set().union(*(v for k, v in vars(module).items() if k.endswith('_DATASET_KEYS') and isinstance(v, set)))
        if known:
            unknown = sorted(set(ds) - known)
            assert not unknown, f'{where}: unknown key(s) {unknown}'
        _check_attention_meta(ds, where)
        assert not any(os.path.isabs(str(ds.get(k, ''))) for k in ds if k.startswith('dataroot')), \
            f'{where}: absolute data paths are not portable'
        with pytest.raises(FileNotFoundError):
            build_dataset(copy.deepcopy(ds))


@pytest.mark.parametrize('edit, error', [
    (('diffusion:', 'diffusio:'), 'unknown option key'),                       # top-level typo
    (('    dataroot_attention:', '    dataroot_attentoin:'), 'unknown'),         # dataset key typo
    (('  lower_bound: 0.4', '  lower_bund: 0.4'), 'unknown option'),           # yoda section typo
    (('  norm_groups: 32', '  norm_groups: 7'), 'norm_groups'),                # network value
    (('    psnr: {type: calculate_psnr,', '    psnr: {type: calculate_psnr, weight: 1,'), 'unknown option'),
    (('  print_freq: 200', '  print_frq: 200'), 'logger.print_frq'),
], ids=['top', 'dataset', 'yoda', 'network', 'metric', 'logger'])
def test_checks_catch_mistakes(tmp_path, edit, error):
    """The checks are not vacuous: one typo in a copy of the main option file fails them."""
    text = open(os.path.join(REPO, 'options', 'train_sr3_yoda.yml'), encoding='utf-8').read()
    assert edit[0] in text
    bad = tmp_path / 'train_bad.yml'
    bad.write_text(text.replace(edit[0], edit[1], 1), encoding='utf-8')
    with pytest.raises((AssertionError, ValueError)) as info:
        check_option_file(str(bad), tmp_path)
    assert error in str(info.value)


def test_model_specific_keys_are_known_along_the_class_hierarchy():
    sr3 = _model_extra_keys('SR3Model')
    assert {'amp', 'nan_policy'} <= sr3['train'] and 'trust_checkpoint' in sr3['path']
    srdiff = _model_extra_keys('SRDiffModel')
    assert {'amp', 'freeze_rrdb'} <= srdiff['train'] and 'srdiff' in srdiff['']
    opt = {'name': 'x', 'train': {'amp': 'bf16', 'amp_typo': 1}, 'path': {'trust_checkpoint': False}}
    assert _unknown_keys(opt, sr3) == ['train.amp_typo']
