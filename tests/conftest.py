"""Shared fixtures: a tiny synthetic dataset in BasicSR LMDB layout and option files for it."""
import copy
import glob
import importlib.util
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

import yoda_plugin  # noqa: F401  (registers everything, installs the torchvision shim)

def mentions(*parts):
    """A pattern for ``pytest.raises(match=...)``: the message carries every one of ``parts`` (literal strings: the
    file, key, option and value it must name), in any order, whatever the wording around them."""
    return '(?s)' + ''.join(f'(?=.*{re.escape(str(p))})' for p in parts)


def assert_mentions(text, *parts):
    """``text`` (an error message, a log, a command's output) carries every one of ``parts``, whatever the wording."""
    missing = [p for p in parts if str(p) not in text]
    assert not missing, f'{missing} not in:\n{text}'


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 4


def synthetic_image(rng, size):
    """A smooth colour gradient plus a few sharp rectangles: structure for edges and SR."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 0.5 * (xx + yy)], axis=2)
    for _ in range(3):
        h, w = rng.integers(size // 6, size // 2, size=2)
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        img[top:top + h, left:left + w] = rng.random(3)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def build_tiny_dataset(root, n_train=6, n_val=2, size=32, seed=0):
    from yoda_plugin.attention import build_attention_source
    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
    from yoda_plugin.data.lmdb_images import write_image_lmdb
    from yoda_plugin.data.transforms import bicubic_resize
    rng = np.random.default_rng(seed)
    source = build_attention_source('edge')
    for split, n in (('train', n_train), ('val', n_val)):
        hr = {f'{split}_{i:02d}': synthetic_image(rng, size) for i in range(n)}
        lr = {k: bicubic_resize(v, (size // SCALE, size // SCALE), 'pil') for k, v in hr.items()}
        write_image_lmdb(os.path.join(root, f'{split}_hr.lmdb'), hr)
        write_image_lmdb(os.path.join(root, f'{split}_lr.lmdb'), lr)
        with AttentionLMDBWriter(os.path.join(root, f'{split}_att.lmdb'), make_attention_meta(source, grid='lr')) as w:
            for k, v in lr.items():
                w.put(k, source(v))
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and robust on a shared, busy CPU."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Capture(logging.Handler):
    """BasicSR's logger does not propagate, so pytest's caplog sees nothing of it."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def basicsr_log():
    """The messages BasicSR's root logger emits during a test, as a list of strings."""
    from basicsr.utils import get_root_logger
    logger = get_root_logger()
    handler, level = _Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # BasicSR sets a level only with a log file
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    return build_tiny_dataset(str(tmp_path_factory.mktemp('tiny_data')))


def tiny_options(data_root, name='tiny', yoda=True, total_iter=4, **overrides):
    """A complete option dict for a tiny SR3(+YODA) run on ``build_tiny_dataset`` data."""
    def ds(split):
        d = {
            'name': f'tiny_{split}', 'type': 'YODAPairedDataset',
            'dataroot_gt': os.path.join(data_root, f'{split}_hr.lmdb'),
            'dataroot_lq': os.path.join(data_root, f'{split}_lr.lmdb'),
            'io_backend': {'type': 'lmdb'}, 'resize': 'pil'
        }
        if yoda:
            d['dataroot_attention'] = os.path.join(data_root, f'{split}_att.lmdb')
            d['attention_meta'] = {'source': {'name': 'edge'}}
        if split == 'train':
            d.update(gt_size=32, use_hflip=True, use_rot=True, use_shuffle=True, num_worker_per_gpu=0,
                     batch_size_per_gpu=2, dataset_enlarge_ratio=1, prefetch_mode=None)
        return d

    opt = {
        'name': name, 'model_type': 'SR3Model', 'scale': SCALE, 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {'train': ds('train'), 'val': ds('val')},
        'network_g': {'type': 'SR3UNet', 'in_channels': 6, 'out_channels': 3, 'base_channels': 16,
                      'channel_mults': [1, 2], 'num_res_blocks': 1, 'attn_resolutions': [16], 'image_size': 32,
                      'dropout': 0.0, 'norm_groups': 8},
        'diffusion': {'schedule': 'linear', 'num_timesteps': 100, 'linear_start': 1e-4, 'linear_end': 0.1,
                      'sample_steps': 5},
        'yoda': {'enabled': yoda, 'lower_bound': 0.3},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100000], 'gamma': 1.0},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'MaskedNoiseLoss', 'loss_weight': 1.0}},
        'val': {'val_freq': total_iter, 'save_img': True, 'sample_seed': 0, 'tb_images': 1,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                            'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': True,
                   'wandb': {'project': None, 'resume_id': None}},
    }
    return copy.deepcopy(apply_overrides(opt, overrides))


def apply_overrides(opt, overrides):
    """``{'train__total_iter': 8}`` sets ``opt['train']['total_iter'] = 8`` (in place; returns ``opt``)."""
    for dotted, value in overrides.items():
        node = opt
        keys = dotted.split('__')
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return opt


def write_options(path, opt):
    """YAML with the plugin-import line first, as our option files have it."""
    with open(path, 'w', encoding='utf-8') as f:
        f.write('yoda_plugin: !!python/name:yoda_plugin.__version__\n')
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def run_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


PYTHON = sys.executable
PRECOMPUTE_SCRIPT = os.path.join(REPO, 'scripts', 'precompute_attention.py')


def run(args, cwd, timeout=300, check=True):
    """A subprocess with the repository importable; its output in the failure message."""
    proc = subprocess.run(args, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def train_log(exp):
    """All BasicSR training logs of an experiment folder, concatenated."""
    logs = sorted(glob.glob(os.path.join(exp, 'train_*.log')))
    assert logs, f'no training log in {exp}'
    return '\n'.join(open(p, encoding='utf-8').read() for p in logs)


def raw_values(path):
    """Every key and value of an LMDB as stored (bytes), e.g. to check that a rerun left them untouched."""
    import lmdb
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def load_script(filename, module_name=None):
    """scripts/<filename> as a module (scripts/ is no package)."""
    path = os.path.join(REPO, 'scripts', filename)
    spec = importlib.util.spec_from_file_location(module_name or os.path.splitext(filename)[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_precompute_script(module_name='precompute_attention'):
    """scripts/precompute_attention.py as a module."""
    return load_script(os.path.basename(PRECOMPUTE_SCRIPT), module_name)
