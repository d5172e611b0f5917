"""One command that exercises every CUDA path of the project and prints one table.

    bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--stages train,network,...]
    python -m yoda_plugin.apps.gpu_check ...       # the same, without the environment set-up (also: yoda-gpu-check)

Stages (``--stages``, default all, in this order):

* ``env``: torch, CUDA, device, bf16 support, a kernel on the device;
* ``train``: tiny SR3+YODA and SRDiff+YODA trainings through our runner (``python -m yoda_plugin train -opt``),
  one per fast path: float32, ``train/val.amp: bf16``, ``fp16`` (GradScaler, its state checked in the saved
  training state), ``channels_last``, ``compile`` (graphs counted in torch's dynamo log);
* ``torchrun``: the same runner under ``torchrun --nproc_per_node=1 ... --launcher pytorch`` (NCCL on a GPU,
  its initialisation checked in NCCL's log; gloo on the CPU), then ``--auto_resume`` to twice the iterations;
* ``network``: the paper's SR3 UNet of each scenario (:data:`SCENARIOS`, the settings of
  ``options/train_sr3_yoda*.yml``: 128, 256, 512; random weights): the time and peak memory of the model's own
  training step (``SR3Model.optimize_parameters``, EMA included) at the scenario's batch size per precision,
  YODA / vanilla step, sampling seconds per image for each sampler and step count, YODA / vanilla sampling,
  sparse / dense;
* ``attention``: attention maps per second for both DINO networks (random weights: same cost).

Every row says PASS, FAIL (with the error), TIMEOUT (its stage's time box was spent first: not proven, counted
as a failure) or SKIP (cannot apply on this device, with the reason; not a failure), and the paper's figure
where the paper gives one. A failing row never stops the others; the exit status is 1 if any row failed, else 0
(2: bad arguments). The table goes to stdout as rows finish and to ``<out>/table.md`` and ``<out>/table.json``
(rewritten after every row, so an interrupted run keeps what it measured); ``<out>/work`` holds the runs' logs,
experiments and the tiny data set.

``--quick`` runs the same paths at toy sizes (toy UNet widths, 32-128 px) and is what the test suite runs on
the CPU (``--device cpu --quick``); ``--device cpu`` without ``--quick`` is refused (hours on a CPU).

It reads no file of the repository: the scenarios are embedded and the training runs use generated data, so
an installed package (``pip install .``) runs it anywhere.
"""
import argparse
import copy
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from yoda_plugin.apps.training_step import (gaussian_attention, set_training_variant, sync, synthetic_batch,
                                            time_training_steps, training_model)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # yoda_plugin/, in a clone or installed
PASS, FAIL, SKIP, TIMEOUT = 'PASS', 'FAIL', 'SKIP', 'TIMEOUT'
FAILING = (FAIL, TIMEOUT)
STAGES = ('env', 'train', 'torchrun', 'network', 'attention')


def _paper_scenario(name: str, scale: int, size: int, attn: int, batch: int) -> dict:
    """The sections of a paper scenario that the network rows read (as in ``options/<file>``)."""
    return {
        'name': name, 'model_type': 'SR3Model', 'scale': scale,
        'network_g': {'type': 'SR3UNet', 'in_channels': 6, 'out_channels': 3, 'base_channels': 64,
                      'channel_mults': [1, 2, 4, 8, 8], 'num_res_blocks': 3, 'attn_resolutions': [attn],
                      'image_size': size, 'dropout': 0.2, 'norm_groups': 32},
        'diffusion': {'schedule': 'linear', 'num_timesteps': 500, 'linear_start': 4e-06, 'linear_end': 0.04,
                      'sample_steps': 200, 'variance': 'posterior', 'clip_denoised': True,
                      'continuous_noise_level': True},
        'yoda': {'enabled': True, 'lower_bound': 0.4, 'lr_noise': 'auto', 'mask_network_input': True},
        'train': {'ema_decay': 0.9999, 'optim_g': {'type': 'AdamW', 'lr': 5e-05, 'weight_decay': 0.0001,
                                                  'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000000], 'gamma': 1.0}, 'nan_policy': 'raise',
                  'pixel_opt': {'type': 'MaskedNoiseLoss', 'loss_weight': 1.0, 'loss_type': 'l1',
                                'normalization': 'all'}},
        'datasets': {'train': {'batch_size_per_gpu': batch}},
    }


# The paper scenarios, embedded so that an installed package needs no option file (a test keeps them equal to
# the option files named here).
SCENARIOS = {
    'options/train_sr3_yoda.yml': _paper_scenario('train_SR3_YODA_16_128_FFHQ', 8, 128, 16, 8),
    'options/train_sr3_yoda_64_256.yml': _paper_scenario('train_SR3_YODA_64_256_FFHQ', 4, 256, 16, 8),
    'options/train_sr3_yoda_64_512.yml': _paper_scenario('train_SR3_YODA_64_512_FFHQ', 8, 512, 32, 4),
}
SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m')
FAST_PATHS = ('fp32', 'bf16', 'fp16', 'channels_last', 'compile')

# The paper's figures (main paper Sec. 4.1, 4.2.2; supplement Sec. 4 and its Table 2).
PAPER_MAPS_PER_S = 120_000 / 120.0
PAPER = {
    'train': 'trained on one A100-80GB, 1M iterations; no step time given',
    'memory': {128: 'batch not stated (SR3: 256); one A100-80GB', 256: 'batch 8 fits one A100-80GB',
               512: 'batch 4 fits one A100-80GB'},
    'yoda_vs_vanilla': 'minimal overhead (supp. Sec. 4)',
    'sparse': 'masks alone save nothing in PyTorch; sparse diffusion left to future work (supp. Sec. 4)',
    'sampling': 'T_eval = 200 DDPM steps; no time given',
    'dino_vits8': '120,000 maps in < 2 min (> 1,000 maps/s; supp. Sec. 4); DINO: ViT-S/8 180 img/s on a V100',
    'dino_resnet50': '120,000 maps in < 2 min (> 1,000 maps/s; supp. Sec. 4); DINO: ResNet-50 1,237 img/s on a V100',
}


# -- the report ------------------------------------------------------------------------------------------
@dataclass
class Row:
    id: str  # stage/what/variant, e.g. train/sr3/bf16 (what --fail-row matches)
    what: str  # in words
    path: str = ''  # the code path it exercised on this device
    status: str = ''
    value: str = ''  # what was measured
    paper: str = ''  # the paper's figure, where it gives one
    note: str = ''  # errors, reasons, fallbacks
    seconds: float = 0.0


class Report:
    """Rows in the order they finish; each printed at once and the table files rewritten."""

    COLUMNS = ('id', 'status', 'what', 'path', 'value', 'paper', 'note', 'seconds')

    def __init__(self, out_dir: str, header: List[str], stream=None):
        self.out_dir, self.header, self.stream = out_dir, header, stream or sys.stdout
        self.rows: List[Row] = []
        self.lock = threading.Lock()
        self.started = time.time()

    def add(self, row: Row) -> Row:
        with self.lock:
            self.rows.append(row)
            print(self.format_row(row), file=self.stream, flush=True)
            self.write()
        return row

    @staticmethod
    def cell(text) -> str:
        return str(text).replace('|', '/').replace('\n', ' ').strip()

    def format_row(self, row: Row) -> str:
        return '| ' + ' | '.join(self.cell(f'{row.seconds:.1f}' if c == 'seconds' else getattr(row, c))
                                 for c in self.COLUMNS) + ' |'

    def table_head(self) -> str:
        return '| ' + ' | '.join(self.COLUMNS) + ' |\n|' + ' --- |' * len(self.COLUMNS)

    def counts(self) -> dict:
        out = {s: 0 for s in (PASS, FAIL, TIMEOUT, SKIP)}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def failed(self) -> List[Row]:
        return [r for r in self.rows if r.status in FAILING]

    def summary(self) -> str:
        c = self.counts()
        return (f'{len(self.rows)} rows: {c[PASS]} PASS, {c[FAIL]} FAIL, {c[TIMEOUT]} TIMEOUT, {c[SKIP]} SKIP; '
                f'{time.time() - self.started:.0f} s')

    def write(self):
        md = '\n'.join(self.header + ['', self.table_head()] + [self.format_row(r) for r in self.rows]
                       + ['', self.summary(), ''])
        _atomic_write(os.path.join(self.out_dir, 'table.md'), md)
        data = {'header': self.header, 'rows': [asdict(r) for r in self.rows], 'counts': self.counts(),
                'seconds': time.time() - self.started}
        _atomic_write(os.path.join(self.out_dir, 'table.json'), json.dumps(data, indent=1))


def _atomic_write(path: str, text: str):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


class TimeBox:
    """A stage's time budget: work that would start after it is spent is reported TIMEOUT."""

    def __init__(self, seconds: float):
        self.seconds, self.start = float(seconds), time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


class InjectedFailure(RuntimeError):
    pass


# -- the settings of a run -------------------------------------------------------------------------------
@dataclass
class Settings:
    device: str
    quick: bool
    out_dir: str
    work_dir: str
    jobs: int
    threads: Optional[int]
    time_boxes: dict
    fail_rows: List[str] = field(default_factory=list)
    train_iters: int = 2  # per training run; the resume run goes on to twice this
    run_limit_s: float = 200.0  # one training subprocess
    compile_options: object = True
    scenario_net: Optional[dict] = None  # toy network_g overrides (quick)
    scenario_sizes: Optional[dict] = None  # {paper size: size run}
    step_repeats: int = 3
    sample_steps: tuple = (20, 50)
    long_ddpm_steps: Optional[int] = 200
    attention_count: int = 1024
    attention_batch: int = 64
    attention_lr_size: int = 16

    @property
    def cuda(self) -> bool:
        return self.device == 'cuda'


def make_settings(args) -> Settings:
    cpus = os.cpu_count() or 1
    cuda = args.device == 'cuda'
    scale = float(args.time_scale)
    if cuda:  # the full check: under 8 minutes on one H200/A100-class GPU
        boxes = {'train': 200, 'network': 170, 'attention': 45}
    else:  # toy sizes on the CPU: under 3 minutes on 2 cores (the boxes only stop a badly overloaded machine)
        boxes = {'train': 300, 'network': 150, 'attention': 90}
    s = Settings(device=args.device, quick=args.quick, out_dir=args.out, work_dir=os.path.join(args.out, 'work'),
                 jobs=args.jobs or (4 if cuda else min(2, cpus)),
                 threads=args.threads if args.threads else (None if cuda else 1),
                 time_boxes={k: v * scale for k, v in boxes.items()}, fail_rows=list(args.fail_row or []))
    # On the CPU inductor needs minutes of C++ compilation for even the tiny UNet (3 min 22 s for 2 iterations
    # here); aot_eager still runs dynamo's tracing and AOT autograd, i.e. everything up to code generation.
    s.compile_options = True if cuda else {'backend': 'aot_eager'}
    s.run_limit_s = (200.0 if cuda else 150.0) * scale
    if args.quick:
        s.scenario_net = {'base_channels': 8, 'channel_mults': [1, 2, 2], 'num_res_blocks': 1,
                          'norm_groups': 4}
        s.scenario_sizes = {128: 32, 256: 64, 512: 128}
        s.step_repeats = 2
        s.sample_steps = (2, 4)
        s.long_ddpm_steps = None
        s.attention_count = 8 if not cuda else 256
        s.attention_batch = 4 if not cuda else 64
    return s


# -- tiny data and option files for the training rows -------------------------------------------------
def synthetic_photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour ramps with a few flat blobs: edges for the attention source, texture for SR."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    phase = rng.random(3) * 2 * np.pi
    img = 0.5 + 0.4 * np.stack([np.sin(2 * np.pi * xx + phase[c]) * np.cos(np.pi * yy) for c in range(3)], axis=2)
    for _ in range(2):
        cy, cx, r = rng.random() * size, rng.random() * size, size * (0.1 + 0.2 * rng.random())
        blob = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 < r * r
        img[blob] = rng.random(3)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def build_check_data(root: str, size: int = 32, scale: int = 4, n_train: int = 4, n_val: int = 2, seed: int = 0):
    """HR / LR / edge-attention LMDBs (BasicSR layout) for the training rows: ``<root>/{train,val}_{hr,lr,att}``."""
    from yoda_plugin.attention import build_attention_source
    from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta
    from yoda_plugin.data.lmdb_images import write_image_lmdb
    from yoda_plugin.data.transforms import bicubic_resize
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    source = build_attention_source('edge')
    for split, n in (('train', n_train), ('val', n_val)):
        hr = {f'{split}_{i:02d}': synthetic_photo(rng, size) for i in range(n)}
        lr = {k: bicubic_resize(v, (size // scale, size // scale), 'pil') for k, v in hr.items()}
        write_image_lmdb(os.path.join(root, f'{split}_hr.lmdb'), hr)
        write_image_lmdb(os.path.join(root, f'{split}_lr.lmdb'), lr)
        with AttentionLMDBWriter(os.path.join(root, f'{split}_att.lmdb'), make_attention_meta(source, grid='lr')) as w:
            for key, img in lr.items():
                w.put(key, source(img))
    return root


def _sr3_check(size: int, scale: int) -> dict:
    return {'model_type': 'SR3Model',
            'network_g': {'type': 'SR3UNet', 'in_channels': 6, 'out_channels': 3, 'base_channels': 16,
                          'channel_mults': [1, 2], 'num_res_blocks': 1, 'attn_resolutions': [16], 'image_size': size,
                          'dropout': 0.0, 'norm_groups': 8},
            'diffusion': {'schedule': 'linear', 'num_timesteps': 100, 'linear_start': 1e-4, 'linear_end': 0.1,
                          'sample_steps': 4},
            'torchrun': {'amp': 'fp16'}}  # under torchrun: the GradScaler's state must survive the resume


def _srdiff_check(size: int, scale: int) -> dict:
    # No RRDB pretraining: the encoder starts random (the model warns) and stays frozen.
    return {'model_type': 'SRDiffModel',
            'network_g': {'type': 'SRDiffNet', 'scale': scale, 'rrdb_num_feat': 8, 'rrdb_num_block': 2,
                          'rrdb_num_grow_ch': 4, 'base_channels': 8, 'channel_mults': [1, 2], 'num_res_blocks': 1},
            'diffusion': {'schedule': 'cosine', 'num_timesteps': 20, 'sample_steps': 4},
            'sections': {'srdiff': {'res_rescale': 2.0, 'clip_input': True}}, 'train': {'freeze_rrdb': True},
            'val': {'tile_size': size // 2, 'tile_overlap': size // 4},  # tiled sampling too
            'torchrun': {'amp': 'bf16', 'channels_last': True}}


# The tiny network and sections of each backbone's training rows, and the fast paths of its torchrun rows.
CHECK_BACKBONES = {'sr3': _sr3_check, 'srdiff': _srdiff_check}


def check_options(data_root: str, name: str, model: str, total_iter: int, num_gpu: int, fast: Optional[dict] = None,
                  size: int = 32, scale: int = 4) -> dict:
    """A complete option dict of a tiny SR3+YODA (``model='sr3'``) or SRDiff+YODA (``'srdiff'``) training on
    :func:`build_check_data`; ``fast``: the train/val fast-path keys (amp, channels_last, compile)."""
    def dataset(split):
        d = {'name': f'check_{split}', 'type': 'YODAPairedDataset',
             'dataroot_gt': os.path.join(data_root, f'{split}_hr.lmdb'),
             'dataroot_lq': os.path.join(data_root, f'{split}_lr.lmdb'),
             'dataroot_attention': os.path.join(data_root, f'{split}_att.lmdb'),
             'attention_meta': {'source': {'name': 'edge'}}, 'io_backend': {'type': 'lmdb'}, 'resize': 'pil'}
        if split == 'train':  # enlarged so that BasicSR's epoch arithmetic gives every iteration
            d.update(gt_size=size, use_hflip=True, use_rot=False, use_shuffle=True, num_worker_per_gpu=0,
                     batch_size_per_gpu=2, dataset_enlarge_ratio=8, prefetch_mode=None)
        return d

    if model not in CHECK_BACKBONES:
        raise ValueError(f'model must be one of {sorted(CHECK_BACKBONES)}, got {model!r}')
    own = CHECK_BACKBONES[model](size, scale)
    opt = {
        'name': name, 'model_type': own['model_type'], 'scale': scale, 'num_gpu': num_gpu, 'manual_seed': 0,
        'datasets': {'train': dataset('train'), 'val': dataset('val')},
        'network_g': own['network_g'], 'diffusion': own['diffusion'],
        'yoda': {'enabled': True, 'lower_bound': 0.3},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100000], 'gamma': 1.0},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'MaskedNoiseLoss', 'loss_weight': 1.0}},
        'val': {'val_freq': total_iter, 'save_img': False, 'sample_seed': 0, 'tb_images': 0,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': total_iter, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
    }
    opt.update(own.get('sections', {}))
    opt['train'].update(own.get('train', {}))
    opt['val'].update(own.get('val', {}))
    for key, value in (fast or {}).items():
        if key not in ('amp', 'channels_last', 'compile'):
            raise ValueError(f'fast-path key must be amp, channels_last or compile, got {key!r}')
        opt['train'][key] = value
        opt['val'][key] = value
    return opt


def write_option_file(path: str, opt: dict) -> str:
    """YAML with the plugin-import line first, as our option files have it."""
    import yaml
    with open(path, 'w', encoding='utf-8') as f:
        f.write('yoda_plugin: !!python/name:yoda_plugin.__version__\n')
        yaml.safe_dump(opt, f, sort_keys=False)
    return path


# -- subprocesses -----------------------------------------------------------------------------------------
def child_env(settings: Settings, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    # The children import the same yoda_plugin as this process (a clone or the installed package).
    env['PYTHONPATH'] = os.path.dirname(PACKAGE_DIR) + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    threads = settings.threads or max(1, (os.cpu_count() or 1) // max(1, settings.jobs))
    env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
    if not settings.cuda:
        env['CUDA_VISIBLE_DEVICES'] = ''  # the CPU path even on a machine with GPUs
    env.update(extra or {})
    return env


def run_logged(cmd: List[str], cwd: str, env: dict, log_path: str, timeout: float):
    """Run ``cmd`` with stdout and stderr into ``log_path``; (exit code or None on timeout, output)."""
    with open(log_path, 'w', encoding='utf-8') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout ends torchrun's workers
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    with open(log_path, encoding='utf-8', errors='replace') as f:
        return rc, f.read()


def last_float(pattern: str, text: str) -> Optional[float]:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def experiment_log(exp_dir: str) -> str:
    names = sorted(n for n in os.listdir(exp_dir) if n.startswith('train_') and n.endswith('.log')) \
        if os.path.isdir(exp_dir) else []
    return '\n'.join(open(os.path.join(exp_dir, n), encoding='utf-8', errors='replace').read() for n in names)


def tail(text: str, lines: int = 3) -> str:
    keep = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return ' / '.join(keep[-lines:])[-600:]


@dataclass
class TrainingRun:
    """One training subprocess and what its logs and saved state must show."""
    row_id: str
    what: str
    model: str  # sr3 | srdiff
    fast: dict
    torchrun: bool = False
    resume: bool = False  # --auto_resume the experiment of the run before it, to twice the iterations
    experiment: str = ''


def training_runs(settings: Settings, stages) -> List[List[TrainingRun]]:
    """Chains of runs (a chain runs in order; chains run in parallel): one per fast path and model through the
    runner, and per model a torchrun run followed by its resume."""
    amp_words = {'fp32': 'float32', 'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast + GradScaler',
                 'channels_last': 'channels_last', 'compile': 'torch.compile'}
    fast_of = {'fp32': {}, 'bf16': {'amp': 'bf16'}, 'fp16': {'amp': 'fp16'}, 'channels_last': {'channels_last': True},
               'compile': {'compile': settings.compile_options}}
    chains = []
    for model, label in (('sr3', 'SR3+YODA'), ('srdiff', 'SRDiff+YODA')):
        if 'torchrun' in stages:
            fast = CHECK_BACKBONES[model](32, 4)['torchrun']
            words = ', '.join(f'{k} {v}' for k, v in fast.items())
            exp = f'check_torchrun_{model}'
            chains.append([TrainingRun(f'torchrun/{model}', f'{label} training under torchrun ({words})', model,
                                       fast, torchrun=True, experiment=exp),
                           TrainingRun(f'torchrun/{model}/resume', f'{label} --auto_resume under torchrun ({words})',
                                       model, fast, torchrun=True, resume=True, experiment=exp)])
        if 'train' in stages:
            for variant in FAST_PATHS:
                chains.append([TrainingRun(f'train/{model}/{variant}', f'{label} training, {amp_words[variant]}',
                                           model, fast_of[variant], experiment=f'check_{model}_{variant}')])
    # longest first: compile, then the two-run chains
    return sorted(chains, key=lambda c: (not any('compile' in r.fast for r in c), -len(c)))


def execute_training_run(run: TrainingRun, settings: Settings, data_root: str, box: TimeBox) -> Row:
    row = Row(run.row_id, run.what)
    start = time.perf_counter()
    cuda = settings.cuda
    try:
        check_injected(run.row_id, settings)
        if box.spent():
            row.status, row.note = TIMEOUT, f'not run: the training time box ({box.seconds:.0f} s) was spent'
            return row
        total = settings.train_iters * (2 if run.resume else 1)
        opt = check_options(data_root, run.experiment, run.model, settings.train_iters, 1 if cuda else 0, run.fast)
        opt_path = write_option_file(os.path.join(settings.work_dir, f'{run.row_id.replace("/", "_")}.yml'), opt)
        extra_env = {}
        if run.torchrun:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                   os.path.join(PACKAGE_DIR, 'train.py'), '-opt', opt_path, '--launcher', 'pytorch']
            if cuda:
                extra_env['NCCL_DEBUG'] = 'INFO'  # NCCL's own initialisation lines prove the backend
        else:
            cmd = [sys.executable, '-m', 'yoda_plugin', 'train', '-opt', opt_path]
        if run.resume:
            cmd += ['--auto_resume', '--force_yml', f'train:total_iter={total}', f'val:val_freq={total}',
                    f'logger:save_checkpoint_freq={total}']
        if 'compile' in run.fast:
            extra_env['TORCH_LOGS'] = 'dynamo'  # one "done compiler function" line per compiled graph
        backend = ('nccl' if cuda else 'gloo') if run.torchrun else None
        row.path = ', '.join(filter(None, [
            'torchrun --nproc_per_node=1 --launcher pytorch' if run.torchrun else 'python -m yoda_plugin train',
            backend, '--auto_resume' if run.resume else None, settings.device,
            f'compile {settings.compile_options}' if 'compile' in run.fast else None]))
        log_path = os.path.join(settings.work_dir, 'logs', f'{run.row_id.replace("/", "_")}.log')
        rc, output = run_logged(cmd, settings.work_dir, child_env(settings, extra_env), log_path,
                                min(settings.run_limit_s, box.left() + 5))
        exp_dir = os.path.join(settings.work_dir, 'experiments', run.experiment)
        log = experiment_log(exp_dir)
        if rc is None:
            row.status, row.note = TIMEOUT, f'killed after its time limit; log {log_path}: {tail(output)}'
            return row
        problems = check_training_output(run, rc, output, log, exp_dir, total, cuda)
        secs = last_float(r'time \(data\): ([0-9.]+)', log)
        loss = last_float(r'l_pix: ([-+0-9.eE]+)', log)
        row.value = f'{total} iterations' + (f', {secs:.3f} s/iter' if secs is not None else '') + \
            (f', l_pix {loss:.4g}' if loss is not None else '')
        if 'compile' in run.fast:
            graphs = len(re.findall(r'done compiler function', output))
            row.value += f', {graphs} graphs compiled'
        if run.fast.get('amp') == 'fp16':
            scale = saved_loss_scale(exp_dir, total)
            if scale is not None:
                row.value += f', loss scale {scale:g}'
        if problems:
            row.status, row.note = FAIL, '; '.join(problems) + f' (log {log_path})'
        else:
            row.status = PASS
            if not cuda and run.fast.get('amp') == 'fp16':
                row.note = 'CPU autocast and GradScaler: the code path, not the CUDA fp16 kernels'
            if not cuda and 'compile' in run.fast:
                row.note = 'aot_eager on the CPU (inductor: minutes of C++ compilation); inductor on a GPU'
        return row
    except Exception as err:  # noqa: BLE001  a row fails, the check goes on
        row.status, row.note = FAIL, f'{type(err).__name__}: {err}'
        return row
    finally:
        row.seconds = time.perf_counter() - start


def saved_loss_scale(exp_dir: str, iteration: int) -> Optional[float]:
    import torch
    path = os.path.join(exp_dir, 'training_states', f'{iteration}.state')
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location='cpu', weights_only=True)
    scaler = state.get('grad_scaler') or {}
    return float(scaler['scale']) if 'scale' in scaler else None


def check_training_output(run: TrainingRun, rc: int, output: str, log: str, exp_dir: str, total: int,
                          cuda: bool) -> List[str]:
    """What a good run leaves: exit 0, the end of training, validation, weights and the state at ``total``."""
    import torch
    problems = []
    if rc != 0:
        problems.append(f'exit code {rc}: {tail(output)}')
    if not log:
        return problems + [f'no training log in {exp_dir}']
    if 'End of training' not in log:
        problems.append('no "End of training" in the log')
    if 'Validation check_val' not in log:
        problems.append('validation did not run')
    gpus = re.findall(r'num_gpu: (\d+)', log)
    if cuda and not (gpus and int(gpus[-1]) >= 1):
        problems.append(f'the run did not use the GPU (num_gpu {gpus[-1] if gpus else "?"})')
    state_path = os.path.join(exp_dir, 'training_states', f'{total}.state')
    if not os.path.isfile(os.path.join(exp_dir, 'models', 'net_g_latest.pth')):
        problems.append('no models/net_g_latest.pth')
    if not os.path.isfile(state_path):
        problems.append(f'no training state {total}.state')
    else:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        if int(state.get('iter', -1)) != total:
            problems.append(f'{total}.state holds iteration {state.get("iter")}')
        if run.fast.get('amp') == 'fp16':
            scale = (state.get('grad_scaler') or {}).get('scale')
            if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
                problems.append(f'no valid GradScaler state in {total}.state (scale {scale})')
    if run.resume and not re.search(r'Resuming training from epoch: \d+, iter: ' + str(total // 2), log):
        problems.append(f'did not resume from iteration {total // 2}')
    if run.torchrun:
        if 'World size (gpu number): 1' not in log:
            problems.append('torchrun: no "World size (gpu number): 1" in the log')
        if f'Ranks in sync at iteration {total}' not in log:
            problems.append(f'torchrun: no rank sync check at iteration {total}')
        if cuda and 'NCCL INFO' not in output:
            problems.append('torchrun: no NCCL initialisation in the output (NCCL_DEBUG=INFO)')
    if 'compile' in run.fast and 'done compiler function' not in output:
        problems.append('torch.compile compiled no graph (TORCH_LOGS=dynamo)')
    for key in run.fast:  # BasicSR's options dump at the top of the log: the keys reached the model
        for phase in ('train', 'val'):
            if not re.search(rf'^    {key}:[ \[]', dumped_section(log, phase), re.M):
                problems.append(f'{phase}.{key} missing from the options in the log')
    if re.search(r'l_pix: (nan|inf)', log):
        problems.append('non-finite loss')
    return problems


def dumped_section(log: str, name: str) -> str:
    """The top-level section ``name`` of BasicSR's options dump (``  name:[`` ... ``  ]``) in a training log."""
    match = re.search(rf'^  {name}:\[\n(.*?)^  \]', log, re.M | re.S)
    return match.group(1) if match else ''


def check_injected(row_id: str, settings: Settings):
    """``--fail-row PATTERN``: make the matching rows fail, to prove a failure is reported and counted."""
    if any(fnmatch.fnmatchcase(row_id, p) for p in settings.fail_rows):
        raise InjectedFailure(f'injected failure (--fail-row) in {row_id}')


def stage_training(report: Report, settings: Settings, stages):
    chains = training_runs(settings, stages)
    if not chains:
        return
    data_root = build_check_data(os.path.join(settings.work_dir, 'data'))
    os.makedirs(os.path.join(settings.work_dir, 'logs'), exist_ok=True)
    box = TimeBox(settings.time_boxes['train'])
    total = sum(len(c) for c in chains)
    print(f'[gpu_check] training: {total} runs in {len(chains)} chains, {settings.jobs} at a time, time box '
          f'{box.seconds:.0f} s; logs in {os.path.join(settings.work_dir, "logs")}', file=sys.stderr, flush=True)

    def run_chain(chain):
        ok = True
        for run in chain:
            if not ok:  # a resume needs the run before it
                report.add(Row(run.row_id, run.what, status=FAIL, note='not run: the run it resumes failed'))
                continue
            row = report.add(execute_training_run(run, settings, data_root, box))
            ok = row.status == PASS

    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        list(pool.map(run_chain, chains))


# -- env --------------------------------------------------------------------------------------------------
def stage_env(report: Report, settings: Settings):
    import torch
    start = time.perf_counter()
    row = Row('env/cuda', 'CUDA device, a kernel on it, bf16 support')
    try:
        check_injected(row.id, settings)
        if not settings.cuda:
            row.status, row.note = SKIP, 'n/a on cpu (--device cpu): no CUDA path exercised by this run'
            row.value = f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}'
        else:
            props = torch.cuda.get_device_properties(0)
            x = torch.randn(256, 256, device='cuda')
            torch.cuda.synchronize()
            ref = x.double() @ x.double().T
            err = float((x @ x.T - ref).abs().max() / ref.abs().max())  # TF32, if on, stays near 1e-3
            row.value = (f'{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor},'
                         f' torch {torch.__version__}, CUDA {torch.version.cuda},'
                         f' cuDNN {torch.backends.cudnn.version()},'
                         f' bf16 {torch.cuda.is_bf16_supported()}, TF32 matmul '
                         f'{torch.backends.cuda.matmul.allow_tf32}, conv {torch.backends.cudnn.allow_tf32}')
            row.path = 'cuda:0 matmul'
            row.status = PASS if err < 1e-2 else FAIL
            row.note = f'matmul vs float64: relative error {err:.1e}'
    except Exception as err:  # noqa: BLE001
        row.status, row.note = FAIL, f'{type(err).__name__}: {err}'
    row.seconds = time.perf_counter() - start
    report.add(row)


# -- the paper network ------------------------------------------------------------------------------------
def scenario_options(path: str, settings: Settings) -> dict:
    """A paper scenario's option dict (:data:`SCENARIOS`) with, for --quick, the toy network and size."""
    opt = copy.deepcopy(SCENARIOS[path])
    paper_size = int(opt['network_g']['image_size'])
    opt['_paper_size'] = paper_size
    if settings.scenario_net:
        size = settings.scenario_sizes[paper_size]
        # the toy net's self-attention at its lowest level, as the paper net's at 16 px
        opt['network_g'].update(settings.scenario_net, image_size=size, attn_resolutions=[size // 4])
    opt['network_g']['use_checkpoint'] = False
    return opt


def make_model(opt: dict, device):
    """The scenario's SR3Model in training mode with seeded random weights on ``device``."""
    torch.manual_seed(0)
    return training_model(opt, device)


def time_training_step(model, opt: dict, device, batch: int, amp: Optional[str], channels_last: bool, repeats: int,
                       yoda: bool = True) -> dict:
    """Median seconds of the model's own training step (``optimize_parameters``: YODA inputs, masked loss,
    backward, optimizer step, EMA) and the peak CUDA memory, in the precision ``amp`` with ``channels_last``
    (the network stays so) and YODA on or off. On CUDA out of memory it retries with gradient checkpointing."""
    data = synthetic_batch(opt, batch, device)
    set_training_variant(model, amp, channels_last, yoda)
    net = model.get_bare_model(model.net_g)
    note = ''
    for attempt in (False, True):  # plain, then gradient checkpointing after an out-of-memory error
        try:
            model.optimizer_g.zero_grad(set_to_none=True)
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            net.use_checkpoint = attempt
            result = time_training_steps(model, data, repeats)
            if not math.isfinite(result['loss']):
                raise FloatingPointError(f'non-finite training loss {result["loss"]}')
            return {**result, 'note': note}
        except torch.cuda.OutOfMemoryError as err:
            if attempt:
                raise
            note = f'out of memory without gradient checkpointing ({str(err).splitlines()[0][:120]}); with it: '
        finally:
            model.optimizer_g.zero_grad(set_to_none=True)
            net.use_checkpoint = False
            set_training_variant(model)  # YODA back on, float32; channels_last is undone before sampling
            if device.type == 'cuda':
                torch.cuda.empty_cache()


def resolver_for(net, opt: dict, device, sampler: str, steps: int, yoda: bool = True, sparse: bool = False):
    from yoda_plugin import YODAResolver
    from yoda_plugin.attention import build_attention_source
    run_opt = copy.deepcopy({k: v for k, v in opt.items() if not k.startswith('_')})
    if not yoda:
        run_opt['yoda'] = {'enabled': False}
    overrides = {'sampler': {'type': sampler, 'steps': steps}}
    overrides['sparse'] = {'enabled': True, 'mode': 'regions', 'margin': 8} if sparse else {'enabled': False}
    # maps are always passed in: the source only satisfies the resolver's set-up (no DINO weights needed)
    return YODAResolver.from_network(net, run_opt, device, attention_source=build_attention_source('gaussian'),
                                     **overrides)


def time_sampling(resolver, lq, lq_up, att) -> dict:
    sync(resolver.device)
    t0 = time.perf_counter()
    out = resolver.sample_prepared(lq, lq_up, att, seed=0)
    sync(resolver.device)
    seconds = time.perf_counter() - t0
    if not bool(out.isfinite().all()):
        raise FloatingPointError('non-finite sampling output')
    stats = resolver.last_info.get('sparse_stats') or {}
    return {'s': seconds, 'share': resolver.last_info.get('update_ratio'),
            'pixels': stats.get('pixels', 0) / max(1, stats.get('dense_pixels', 0)) if stats else None}


def measured_row(report: Report, settings: Settings, row: Row, box: TimeBox, measure: Callable[[Row], None],
                 skip_reason: Optional[str] = None):
    """Run ``measure(row)`` (it fills value/note) unless skipped or the box is spent; errors make it FAIL."""
    start = time.perf_counter()
    try:
        check_injected(row.id, settings)
        if skip_reason:
            row.status, row.note = SKIP, skip_reason
        elif box.spent():
            stage = row.id.split('/')[0]
            row.status, row.note = TIMEOUT, f'not run: the {stage} time box ({box.seconds:.0f} s) was spent'
        else:
            measure(row)
            row.status = row.status or PASS
    except Exception as err:  # noqa: BLE001  a row fails, the check goes on
        row.status, row.note = FAIL, f'{type(err).__name__}: {err}'
        if not isinstance(err, InjectedFailure):
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    row.seconds = time.perf_counter() - start
    report.add(row)
    return row


def stage_network(report: Report, settings: Settings):
    import torch
    device = torch.device(settings.device)
    box = TimeBox(settings.time_boxes['network'])
    where = 'cuda' if settings.cuda else 'cpu'
    print(f'[gpu_check] network: {len(SCENARIOS)} scenarios ({"toy nets" if settings.quick else "paper net"}), '
          f'time box {box.seconds:.0f} s', file=sys.stderr, flush=True)
    # one model per scenario, for every row (building the 128.8M-parameter UNet and its EMA copy takes seconds);
    # each row sets its precision and memory format and undoes them
    precisions = [('fp32', None, False), ('bf16', 'bf16', False), ('fp16', 'fp16', False),
                  ('yoda_vs_vanilla', None, False), ('channels_last+bf16', 'bf16', True)]
    for path in SCENARIOS:
        opt = scenario_options(path, settings)
        paper, size = opt['_paper_size'], int(opt['network_g']['image_size'])
        batch, scale = int(opt['datasets']['train']['batch_size_per_gpu']), int(opt['scale'])
        label = f'SR3 {paper // scale}->{paper}' + (f' (toy net, {size} px)' if settings.quick else ' (paper net)')
        shared, fp32 = {}, {}

        def model():
            if 'model' not in shared:
                shared['model'] = make_model(opt, device)
            return shared['model']

        def network():  # the trained network samples too (random weights either way)
            return model().get_bare_model(model().net_g)

        for name, amp, cl in precisions:
            if name == 'yoda_vs_vanilla':
                row = Row(f'network/{paper}/train/yoda_vs_vanilla',
                          f'{label}: YODA / vanilla training step, batch {batch}', path=f'{where}, float32',
                          paper=PAPER['yoda_vs_vanilla'])

                def measure_yoda(row):
                    van = time_training_step(model(), opt, device, batch, None, False, settings.step_repeats,
                                             yoda=False)
                    yod = fp32 or time_training_step(model(), opt, device, batch, None, False, settings.step_repeats)
                    row.value = f'{yod["step_s"] / van["step_s"]:.3f} ({yod["step_s"]:.3f} / {van["step_s"]:.3f} s)'
                measured_row(report, settings, row, box, measure_yoda)
                continue
            skip = None
            if amp == 'fp16' and not settings.cuda:
                skip = 'n/a on cpu: no fast fp16 kernels (92x the float32 step here); fp16 + GradScaler in train/*'
            row = Row(f'network/{paper}/train/{name}', f'{label}: training step, batch {batch}, {name}',
                      path=f'{where}, ' + ('autocast ' + amp if amp else 'float32') + (', channels_last' if cl else '')
                      + (', GradScaler' if amp == 'fp16' else ''), paper=PAPER['memory'][paper])

            def measure(row, amp=amp, cl=cl, name=name):
                r = time_training_step(model(), opt, device, batch, amp, cl, settings.step_repeats)
                if name == 'fp32':
                    fp32.update(r)
                mem = ''
                if r['peak_gib'] is not None:  # the paper's A100-80GB holds 74.5 GiB
                    mem = f', peak {r["peak_gib"]:.2f} GiB (fits 80 GB: {"yes" if r["peak_gib"] < 74.5 else "no"})'
                row.value = f'{r["step_s"]:.3f} s/step{mem}, {r["params_m"]:.1f}M params'
                if not settings.quick:  # the paper trains 1M iterations
                    row.value += f'; 1M iterations: {r["step_s"] * 1e6 / 86400:.1f} d'
                if fp32 and name != 'fp32':
                    row.value += f'; x{fp32["step_s"] / r["step_s"]:.2f} vs float32'
                row.note = r['note'] + ('' if settings.cuda else 'memory: CUDA only (CPU: scripts/benchmark_memory.py)')
            measured_row(report, settings, row, box, measure, skip)
        sampling_rows(report, settings, opt, label, paper, device, box, where, network)
        shared.clear()
        if device.type == 'cuda':
            torch.cuda.empty_cache()


def sampling_rows(report, settings, opt, label, paper, device, box, where, network):
    import torch
    size, scale = int(opt['network_g']['image_size']), int(opt['scale'])
    g = torch.Generator().manual_seed(1)
    lq = torch.rand(1, 3, size // scale, size // scale, generator=g).to(device)
    lq_up = torch.nn.functional.interpolate(lq, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)
    att = gaussian_attention(1, size, device)
    state = {}

    def net():
        if 'net' not in state:
            state['net'] = network().eval()
            warm = resolver_for(state['net'], opt, device, 'ddpm', 1)
            time_sampling(warm, lq, lq_up, att)  # kernels, allocator: untimed
        return state['net']

    base = {}
    for sampler in SAMPLERS:
        row = Row(f'network/{paper}/sample/{sampler}', f'{label}: YODA sampling, {sampler}, s/image (batch 1)',
                  path=f'{where}, float32, YODAResolver', paper=PAPER['sampling'] if sampler == 'ddpm' else '')

        def measure(row, sampler=sampler):
            parts = []
            for steps in settings.sample_steps:
                r = time_sampling(resolver_for(net(), opt, device, sampler, steps), lq, lq_up, att)
                base.setdefault((sampler, steps), r)
                parts.append(f'{steps} steps {r["s"]:.3f} s')
            long = settings.long_ddpm_steps
            if sampler == 'ddpm' and long:
                last = settings.sample_steps[-1]
                expected = base[('ddpm', last)]['s'] * long / last
                if expected < 0.5 * box.left():
                    r = time_sampling(resolver_for(net(), opt, device, sampler, long), lq, lq_up, att)
                    parts.append(f'{long} steps (T_eval) {r["s"]:.3f} s')
                else:
                    parts.append(f'{long} steps (T_eval) ~{expected:.2f} s (from {last} steps: time box)')
            share = base[(sampler, settings.sample_steps[-1])]['share']
            row.value = ', '.join(parts) + f'; update share {share:.3f}'
        measured_row(report, settings, row, box, measure)
    steps = settings.sample_steps[0]
    row = Row(f'network/{paper}/sample/yoda_vs_vanilla', f'{label}: YODA / vanilla sampling, ddpm {steps} steps',
              path=f'{where}, float32, dense', paper=PAPER['yoda_vs_vanilla'])

    def side_by_side(first, second, repeats=2):
        """The fastest of ``repeats`` interleaved samplings with each of two resolvers (a ratio of two noisy
        single runs would mostly measure the noise)."""
        runs = [[], []]
        for _ in range(repeats):
            for i, (resolver, attention) in enumerate((first, second)):
                runs[i].append(time_sampling(resolver, lq, lq_up, attention))
        return [min(r, key=lambda x: x['s']) for r in runs]

    def measure_vanilla(row):
        yod, van = side_by_side((resolver_for(net(), opt, device, 'ddpm', steps), att),
                                (resolver_for(net(), opt, device, 'ddpm', steps, yoda=False), None))
        row.value = (f'{yod["s"] / van["s"]:.3f} ({yod["s"]:.3f} / {van["s"]:.3f} s); '
                     f'YODA update share {yod["share"]:.3f}')
    measured_row(report, settings, row, box, measure_vanilla)
    row = Row(f'network/{paper}/sample/sparse_vs_dense',
              f'{label}: sparse (regions:8) / dense YODA, ddpm {steps} steps', path=f'{where}, float32, val.sparse',
              paper=PAPER['sparse'])

    def measure_sparse(row):
        dense, sp = side_by_side((resolver_for(net(), opt, device, 'ddpm', steps), att),
                                 (resolver_for(net(), opt, device, 'ddpm', steps, sparse=True), att))
        pixels = f'{sp["pixels"]:.3f}' if sp['pixels'] is not None else '?'
        row.value = (f'{sp["s"] / dense["s"]:.3f} ({sp["s"]:.3f} / {dense["s"]:.3f} s); pixels evaluated {pixels}, '
                     f'update share {dense["share"]:.3f}')
        if sp['pixels'] is not None and sp['pixels'] >= 1.0:
            row.note = 'crops cost more than val.sparse.max_fraction of the image: whole-image fallback'
    measured_row(report, settings, row, box, measure_sparse)
    state.clear()


# -- attention maps ---------------------------------------------------------------------------------------
def stage_attention(report: Report, settings: Settings):
    import torch
    from yoda_plugin.attention import build_attention_source
    from yoda_plugin.attention.dino import OFFICIAL_WEIGHTS, resnet50_backbone, vit_small_patch8
    box = TimeBox(settings.time_boxes['attention'])
    device = torch.device(settings.device)
    rng = np.random.default_rng(0)
    n, b, lr = settings.attention_count, settings.attention_batch, settings.attention_lr_size
    images = [rng.integers(0, 256, (lr, lr, 3), dtype=np.uint8) for _ in range(n)]
    print(f'[gpu_check] attention: 2 DINO networks x {n} maps, time box {box.seconds:.0f} s', file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix='yoda_gpu_check_dino_') as tmp:
        for name, builder in (('dino_vits8', vit_small_patch8), ('dino_resnet50', resnet50_backbone)):
            row = Row(f'attention/{name}', f'{name} attention maps/s (random weights), {n} LR images {lr}x{lr}, '
                      f'batch {b}', path=f'{settings.device}, {name}.batch, short side 224', paper=PAPER[name])

            def measure(row, name=name, builder=builder):
                torch.manual_seed(0)
                weights = os.path.join(tmp, OFFICIAL_WEIGHTS[name])
                torch.save(builder().state_dict(), weights)  # the official key layout: same cost as real weights
                source = build_attention_source(name, weights=weights, device=str(device), max_batch=b)
                source.batch(images[:b])  # warm-up: weights to the device, kernels
                sync(device)
                t0 = time.perf_counter()
                maps = []
                for i in range(0, n, b):
                    maps.extend(source.batch(images[i:i + b]))
                sync(device)
                seconds = time.perf_counter() - t0
                if len(maps) != n or not all(m.shape == (lr, lr) and np.isfinite(m).all() for m in maps):
                    raise ValueError(f'expected {n} finite {lr}x{lr} maps')
                rate = n / seconds
                minutes = 120_000 / rate / 60
                row.value = f'{rate:,.1f} maps/s; 120,000 maps: ' + (f'{minutes:.1f} min' if minutes < 120 else
                                                                     f'{minutes / 60:.1f} h')
                row.note = (f'{"meets" if rate > PAPER_MAPS_PER_S else "below"} the paper\'s > 1,000 maps/s'
                            if settings.cuda else 'CPU figure: not comparable with the paper\'s GPU figure')
            measured_row(report, settings, row, box, measure)


# -- main -------------------------------------------------------------------------------------------------
def build_parser():
    import torch
    p = argparse.ArgumentParser(prog='gpu_check', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='default: cuda when available')
    p.add_argument('--quick', action='store_true', help='toy sizes (what the tests run on the CPU)')
    p.add_argument('--out', help='results folder (default: results/gpu_check/<UTC time>_<device>[_quick])')
    p.add_argument('--stages', default=','.join(STAGES), help=f'comma-separated subset of {",".join(STAGES)}')
    p.add_argument('--jobs', type=int, help='training runs at a time (default: 4 on cuda, 2 on cpu)')
    p.add_argument('--threads', type=int, help='CPU threads per process (default: 1 on cpu, torch\'s on cuda)')
    p.add_argument('--time-scale', type=float, default=1.0,
                   help='multiply every time box by this (e.g. 2 on a slow or busy machine)')
    p.add_argument('--fail-row', action='append', metavar='PATTERN',
                   help='make rows whose id matches this glob fail (to test the failure path); repeatable')
    return p


def main(argv=None) -> int:
    import torch
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(',') if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f'--stages: unknown {", ".join(unknown) or "(empty)"}; choose from {", ".join(STAGES)}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available on this machine (torch '
                     f'{torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu --quick')
    if args.device == 'cpu' and not args.quick:
        parser.error('--device cpu needs --quick: the paper sizes take hours on a CPU (the benchmark scripts '
                     'measure them: see README, Performance)')
    if args.jobs is not None and args.jobs < 1 or args.threads is not None and args.threads < 1 \
            or args.time_scale <= 0:
        parser.error('--jobs, --threads and --time-scale must be positive')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d_%H%M%S')
    out = args.out or os.path.join('results', 'gpu_check', f'{stamp}_{args.device}' + ('_quick' if args.quick else ''))
    if os.path.exists(out) and os.listdir(out):
        parser.error(f'--out {out}: the folder exists and is not empty; the check never writes into earlier results')
    args.out = os.path.abspath(out)
    os.makedirs(os.path.join(args.out, 'work'), exist_ok=True)
    settings = make_settings(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    where = (torch.cuda.get_device_name(0) if settings.cuda
             else f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
             f'{torch.get_num_threads()} torch threads)')
    header = [f'# YODA GPU check, {stamp} UTC',
              '',
              f'device: {settings.device} ({where}); torch {torch.__version__}; '
              f'{"quick (toy sizes)" if settings.quick else "full"}; stages {",".join(stages)}; '
              f'{settings.jobs} training runs at a time; time boxes (s) ' +
              ', '.join(f'{k} {v:.0f}' for k, v in settings.time_boxes.items())]
    if not settings.cuda:
        header.append('No GPU was used: every row ran its code path on the CPU; rows that only apply on CUDA say SKIP.')
    report = Report(args.out, header)
    print('\n'.join(header + ['', report.table_head()]), flush=True)
    started = time.perf_counter()
    if 'env' in stages:
        stage_env(report, settings)
    if 'train' in stages or 'torchrun' in stages:
        stage_training(report, settings, stages)
    if 'network' in stages:
        stage_network(report, settings)
    if 'attention' in stages:
        stage_attention(report, settings)
    report.write()
    print(f'\n{report.summary()}')
    failed = report.failed()
    if failed:
        print('failed: ' + ', '.join(r.id for r in failed))
    print(f'table: {os.path.join(args.out, "table.md")} and table.json (work folder: {settings.work_dir}); '
          f'{time.perf_counter() - started:.0f} s')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
