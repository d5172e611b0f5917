"""SR3 (Saharia et al.) with and without YODA, as a BasicSR model.

Training draws a time step, noises the HR image (Eq. 3, SR3's continuous noise
level) and regresses the noise with the masked loss (Eq. 10); with YODA the
network input is M(t) * z_t (Eq. 11) unless ``yoda.mask_network_input`` is
false. Validation and testing sample with the EMA weights on a respaced grid
(``diffusion.sample_steps``; the paper: T_train 500, T_eval 200) with the
masked reverse step (Eq. 12-14).
"""
import os
import time
from collections import OrderedDict
from os import path as osp

import torch
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from yoda_plugin.core import (DiffusionSchedule, SparseDenoiser, YODAConfig, pixel_update_ratio, sample_loop,
                              training_inputs)
from yoda_plugin.core.sampler import VARIANCE_TYPES
from yoda_plugin.core.schedule import make_beta_schedule

DIFFUSION_DEFAULTS = {
    'schedule': 'linear',
    'num_timesteps': 500,
    # SR3's 2000-step linear schedule (1e-6 .. 1e-2) compressed to 500 steps:
    # the same end point, abar_T = exp(-10), i.e. z_T is pure noise.
    'linear_start': 4e-6,
    'linear_end': 4e-2,
    'cosine_s': 8e-3,
    'sample_steps': 200,
    'variance': 'posterior',
    'clip_denoised': True,
    'continuous_noise_level': True,
}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'sample_seed', 'progress', 'tb_images',
            'save_attention', 'sparse', 'amp', 'channels_last', 'compile'}
SPARSE_DEFAULTS = {'enabled': False, 'mode': 'regions', 'margin': 32, 'max_fraction': 0.9, 'granularity': None,
                   'region_cost': 1024}


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, weights_only: bool = True):
    """``torch.load`` on the CPU with errors that name the file and what to do."""
    import pickle
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only and 'Unsupported global' in str(err):
            raise ValueError(
                f'{path} needs unsafe unpickling (it stores Python objects beyond tensors and plain containers), '
                f'so it was refused under torch.load(weights_only=True). Only if you trust its origin, set '
                f'"path: {{trust_checkpoint: true}}" in the option file to load it with weights_only=False. '
                f'({str(err).splitlines()[0]})') from err
        raise ValueError(f'{path} is not a PyTorch checkpoint: {str(err).splitlines()[-1] or err}') from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (truncated or another format?): {err}') from err


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors (loadable with weights_only=True)."""
    import random

    import numpy as np
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]), 'numpy_has_gauss': int(np_state[3]), 'numpy_gauss': float(np_state[4]),
        'python_keys': torch.tensor(py_keys, dtype=torch.int64), 'python_version': int(py_version),
        'python_gauss': py_gauss,
    }


def set_rng_state(state: dict):
    import random

    import numpy as np
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    random.setstate((state['python_version'], tuple(int(v) for v in state['python_keys'].tolist()),
                     state['python_gauss']))


def diffusion_options(opt: dict, where: str = 'diffusion') -> dict:
    opt = dict(opt or {})
    unknown = sorted(set(opt) - set(DIFFUSION_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown option(s) {[where + "." + k for k in unknown]}; known: {sorted(DIFFUSION_DEFAULTS)}')
    out = {**DIFFUSION_DEFAULTS, **opt}
    if out['variance'] not in VARIANCE_TYPES:
        raise ValueError(f'{where}.variance must be one of {VARIANCE_TYPES}, got {out["variance"]!r}')
    steps = out['sample_steps']
    if not isinstance(steps, int) or not 1 <= steps <= out['num_timesteps']:
        raise ValueError(f'{where}.sample_steps (T_eval) must be an integer in [1, num_timesteps={out["num_timesteps"]}]'
                         f', got {steps!r}')
    return out


@MODEL_REGISTRY.register()
class SR3Model(SRModel):
    """SR3 diffusion SR; YODA on or off via the ``yoda`` option section.

    Extra options on top of BasicSR's SRModel:
        diffusion: schedule, num_timesteps (T_train), linear_start, linear_end,
            cosine_s, sample_steps (T_eval), variance (posterior|beta),
            clip_denoised, continuous_noise_level.
        yoda: enabled, lower_bound, lr_noise (marginal|posterior),
            mask_network_input. Absent or ``enabled: false``: vanilla SR3.
        train.nan_policy: ``raise`` (default) stops on a non-finite loss naming
            the iteration; ``skip`` drops that step.
        train.amp / val.amp: autocast dtype of the network, null (float32),
            ``bf16`` or ``fp16`` (training with a GradScaler, its state saved in the training state); the loss and the
            diffusion arithmetic stay float32.
        val.sample_seed: seed of the sampling noise (image i uses seed + i),
            so validations at different iterations are comparable.
        val.progress: tqdm bar over sampling steps. val.tb_images: how many
            validation images go to tensorboard. val.save_attention: also save
            the attention map next to the SR image.
    """
    # Option keys read beyond BasicSR's own (sections: '' top level, 'train', 'path'); tests/test_options.py
    # accepts them, merged along the class hierarchy.
    extra_option_keys = {'train': {'nan_policy', 'amp', 'channels_last', 'compile'}, 'path': {'trust_checkpoint'}}

    def __init__(self, opt):
        self.diffusion_opt = diffusion_options(opt.get('diffusion'))
        self.yoda = YODAConfig.from_options(opt.get('yoda'))
        d = self.diffusion_opt
        betas = make_beta_schedule(d['schedule'], d['num_timesteps'], d['linear_start'], d['linear_end'], d['cosine_s'])
        self.schedule = DiffusionSchedule(betas)
        self.sample_schedule = self.schedule.respace(d['sample_steps'])
        unknown_val = sorted(set(opt.get('val') or {}) - VAL_KEYS)
        if unknown_val:
            raise ValueError(f'unknown option(s) {["val." + k for k in unknown_val]}; known: {sorted(VAL_KEYS)}')
        super().__init__(opt)
        self.sparse_options()  # unknown val.sparse keys fail now, not at the first validation
        for phase in ('train', 'val'):
            self.amp_dtype(phase)  # bad amp values fail now too
        # fp16 gradients underflow without loss scaling; None: no scaler (float32 or bf16 training).
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype('train') == torch.float16 else None
        if self.device.type != 'cuda' and torch.float16 in (self.amp_dtype('train'), self.amp_dtype('val')):
            get_root_logger().warning('amp: fp16 on the CPU has no fast kernels (a training step of the paper UNet '
                                      'took 92x the float32 time here); use bf16 on the CPU')
        self._apply_fast_paths()
        for name, metric in ((opt.get('val') or {}).get('metrics') or {}).items():
            if metric.get('type') == 'calculate_lpips':  # a missing backbone fails now, not after sampling
                from yoda_plugin.metrics.lpips_metric import resolve_alexnet_weights
                resolve_alexnet_weights(metric.get('weights'))
        logger = get_root_logger()
        logger.info(f'Diffusion: train {self.schedule}, sample {self.sample_schedule}; '
                    f'YODA: {self.yoda.as_dict() if self.yoda.enabled else "off (vanilla SR3)"}')

    # -- devices and optimisers ------------------------------------------------------------------
    def model_to_device(self, net):
        """As BasicSR's, but DistributedDataParallel also on CPU (gloo), after the fast-path options."""
        net = net.to(self.device)
        self._apply_fast_paths(net, 'train' if self.is_train else 'val')
        if self.opt['dist']:
            find_unused = self.opt.get('find_unused_parameters', False)
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` optimizer by name (the paper: AdamW)."""
        cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f'train.optim_g.type: {optim_type!r} is not a torch.optim optimizer (e.g. AdamW, Adam)')
        return cls(params, lr, **kwargs)

    # -- data --------------------------------------------------------------------------------------
    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)
        self.lq_up = data['lq_up'].to(self.device) if 'lq_up' in data else torch.nn.functional.interpolate(
            self.lq, scale_factor=self.opt['scale'], mode='bicubic', align_corners=False).clamp(0, 1)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)
        self.attention = data['attention'].to(self.device) if 'attention' in data else None
        if self.yoda.enabled and self.attention is None:
            raise ValueError('YODA is enabled (yoda.enabled: true) but the dataset returns no attention map: '
                             'set dataroot_attention in the dataset options')

    # -- training ----------------------------------------------------------------------------------
    def _denoise(self, net, z_in, noise_level, cond=None):
        """The network's noise prediction, under ``train.amp`` / ``val.amp`` autocast, as float32."""
        cond = self.lq_up * 2 - 1 if cond is None else cond
        if getattr(self.get_bare_model(net), '_yoda_channels_last', False):
            z_in = z_in.contiguous(memory_format=torch.channels_last)
            cond = cond.contiguous(memory_format=torch.channels_last)
        dtype = self.amp_dtype('train' if net.training else 'val')
        if dtype is None:
            return net(z_in, cond, noise_level)
        with torch.autocast(self.device.type, dtype=dtype):
            return net(z_in, cond, noise_level).float()

    def _apply_fast_paths(self, net=None, phase=None):
        """``train.channels_last`` / ``train.compile`` for the trained network, ``val.*`` for the sampling one.

        channels_last stores conv weights (and feeds inputs) NHWC, which tensor cores prefer under
        mixed precision. ``compile`` wraps the module's ``forward`` with ``torch.compile`` (``true`` or
        a dict of its keyword arguments), so state dicts and checkpoints keep their keys. Applied
        before any DistributedDataParallel wrap (from ``model_to_device``) and to the EMA copy.
        """
        if net is None:  # after construction: the separate EMA network samples
            if hasattr(self, 'net_g_ema'):
                self._apply_fast_paths(self.net_g_ema, 'val')
            return
        section = self.opt.get(phase) or {}
        compile_opt = section.get('compile', False)
        if compile_opt not in (True, False, None) and not isinstance(compile_opt, dict):
            raise ValueError(f'{phase}.compile must be true, false or a dict of torch.compile arguments, '
                             f'got {compile_opt!r}')
        if section.get('channels_last') and not getattr(net, '_yoda_channels_last', False):
            net.to(memory_format=torch.channels_last)
            net._yoda_channels_last = True
        if compile_opt and not getattr(net, '_yoda_compiled', False):
            net.forward = torch.compile(net.forward, **(compile_opt if isinstance(compile_opt, dict) else {}))
            net._yoda_compiled = True

    def amp_dtype(self, phase: str):
        """``train.amp`` / ``val.amp``: null (float32), ``bf16`` or ``fp16`` (training with a GradScaler)."""
        section = self.opt.get(phase) or {}
        value = section.get('amp')
        if value in (None, False, 'none'):
            return None
        dtypes = {'bf16': torch.bfloat16, 'fp16': torch.float16}
        if value not in dtypes:
            raise ValueError(f'{phase}.amp must be null, bf16 or fp16, got {value!r}')
        return dtypes[value]

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        x0 = self.gt * 2 - 1
        inputs = training_inputs(self.schedule, x0, self.attention, self.yoda, None,
                                 self.diffusion_opt['continuous_noise_level'])
        eps = self._denoise(self.net_g, inputs['z_in'], inputs['noise_level'])
        l_pix = self.cri_pix(eps, inputs['noise'], inputs['mask'])
        self.apply_loss(l_pix, inputs['mask'], current_iter)

    def apply_loss(self, l_pix, mask, current_iter):
        """NaN policy, backward (GradScaler with fp16), optimizer step, loss log and EMA update."""
        if not torch.isfinite(l_pix):
            policy = self.opt['train'].get('nan_policy', 'raise')
            msg = f'non-finite training loss ({l_pix.item()}) at iteration {current_iter}'
            if policy == 'skip':
                get_root_logger().warning(msg + ': step skipped (train.nan_policy: skip)')
                self.optimizer_g.zero_grad(set_to_none=True)
                self.log_dict = OrderedDict(l_pix=float('nan'), skipped=1.0)
                return
            raise FloatingPointError(msg + '; weights were not updated. Lower the learning rate or set '
                                     'train.nan_policy: skip')
        if self.grad_scaler is not None:
            self.grad_scaler.scale(l_pix).backward()
            self.grad_scaler.step(self.optimizer_g)
            self.grad_scaler.update()
        else:
            l_pix.backward()
            self.optimizer_g.step()
        loss_dict = OrderedDict(l_pix=l_pix.detach())
        if mask is not None:
            loss_dict['mask_ratio'] = mask.mean().detach()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # -- sampling ----------------------------------------------------------------------------------
    def _sampling_net(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)
        return net

    def sampling_generator(self, seed):
        """A generator on the model's device seeded with ``seed`` (None: the global RNG)."""
        if seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        return generator

    @torch.no_grad()
    def sample(self, seed=None, progress=False, callback=None):
        """Super-resolve the fed batch; returns images in [0, 1]."""
        net = self._sampling_net()
        was_training = net.training
        net.eval()
        generator = self.sampling_generator(seed)
        schedule = self.sample_schedule
        self.sparse_stats = None

        def denoise(z_in, k):
            return self._denoise(net, z_in, schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1))

        clip = (-1.0, 1.0) if self.diffusion_opt['clip_denoised'] else None
        sparse = self.sparse_options()
        pass_mask = False
        if sparse['enabled'] and self.yoda.enabled:
            cond = self.lq_up * 2 - 1

            def net_fn(z_in, k, box):
                c = cond if box is None else cond[..., box[0]:box[1], box[2]:box[3]]
                return self._denoise(net, z_in, schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1), c)

            denoise = self.sparse_denoiser(net_fn, sparse, self.downsampling_factor())
            pass_mask = True
        z = sample_loop(denoise, schedule, self.lq_up * 2 - 1, self.attention if self.yoda.enabled else None,
                        self.yoda, generator, clip, self.diffusion_opt['variance'], progress, callback, pass_mask)
        if was_training:
            net.train()
        return ((z + 1) / 2).clamp(0, 1)

    def sparse_options(self) -> dict:
        """``val.sparse``: crop the network input to the active mask region (approximate for the UNet)."""
        opt = dict((self.opt.get('val') or {}).get('sparse') or {})
        unknown = sorted(set(opt) - set(SPARSE_DEFAULTS))
        if unknown:
            raise ValueError(f'unknown option(s) {["val.sparse." + k for k in unknown]}; known: {sorted(SPARSE_DEFAULTS)}')
        opt = {**SPARSE_DEFAULTS, **opt}
        if not isinstance(opt['enabled'], bool):
            raise ValueError(f'val.sparse.enabled must be true or false, got {opt["enabled"]!r}')
        try:  # the sampler checks the other values
            SparseDenoiser(None, opt['margin'], 1, opt['max_fraction'], opt['mode'], opt['granularity'],
                           opt['region_cost'])
        except ValueError as err:
            raise ValueError(f'val.{err}') from None
        return opt

    def sparse_denoiser(self, net_fn, sparse: dict, multiple: int) -> SparseDenoiser:
        """The ``val.sparse`` sampler around ``net_fn``; its counters are kept in ``self.sparse_stats``."""
        denoise = SparseDenoiser(net_fn, sparse['margin'], multiple, sparse['max_fraction'], sparse['mode'],
                                 sparse['granularity'], sparse['region_cost'])
        self.sparse_stats = denoise.stats
        return denoise

    def downsampling_factor(self) -> int:
        """Crops for the UNet must be multiples of its total downsampling."""
        mults = self.opt['network_g'].get('channel_mults', (1, 2, 4, 8, 8))
        return 2**(len(mults) - 1)

    def test(self, seed=None):
        val_opt = self.opt.get('val') or {}
        self.output = self.sample(seed=seed, progress=bool(val_opt.get('progress', False)))

    def update_ratio(self):
        """YODA's share of pixel updates versus full diffusion for the fed batch (1.0 when off)."""
        if not self.yoda.enabled:
            return torch.ones(self.lq.shape[0])
        s = self.sample_schedule
        return pixel_update_ratio(self.attention, self.yoda.lower_bound, s.timesteps, s.num_train_timesteps).cpu()

    def get_current_visuals(self):
        out = OrderedDict(lq=self.lq.detach().cpu(), lq_up=self.lq_up.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'gt'):
            out['gt'] = self.gt.detach().cpu()
        if self.attention is not None:
            out['attention'] = self.attention.detach().cpu()
        return out

    # -- validation --------------------------------------------------------------------------------
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validation(dataloader, current_iter, tb_logger, save_img, rank=0, world_size=1)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Every rank samples its share of the images (i = rank, rank + N, ...); rank 0 gathers.

        BasicSR validates on rank 0 only, leaving the other GPUs idle through
        hundreds of sampling steps per image. Image i uses seed ``sample_seed + i``
        whichever rank samples it, so results equal a single-process run.
        """
        self._validation(dataloader, current_iter, tb_logger, save_img, rank=self.opt['rank'],
                         world_size=self.opt['world_size'])

    def _validation(self, dataloader, current_iter, tb_logger, save_img, rank, world_size):
        from torch.utils.data import default_collate
        dataset = dataloader.dataset
        dataset_name = dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics') or {}
        seed = val_opt.get('sample_seed', 0)
        tb_images = int(val_opt.get('tb_images', 2))
        indices = range(rank, len(dataset), world_size)
        pbar = tqdm(total=len(indices), unit='image') if val_opt.get('pbar', False) and rank == 0 else None
        rows = []
        for idx in indices:
            val_data = default_collate([dataset[idx]])
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            start = time.perf_counter()
            self.test(seed=None if seed is None else seed + idx)
            seconds = time.perf_counter() - start
            ratio = float(self.update_ratio().mean())
            visuals = self.get_current_visuals()
            sr_img = tensor2img([visuals['result']])
            metric_data = {'img': sr_img}
            if 'gt' in visuals:
                metric_data['img2'] = tensor2img([visuals['gt']])
            if save_img:
                folder, suffix = self._image_folder(dataset_name, img_name, current_iter)
                imwrite(sr_img, osp.join(folder, f'{img_name}_{suffix}.png'))
                if val_opt.get('save_attention') and 'attention' in visuals:
                    imwrite(tensor2img([visuals['attention']]), osp.join(folder, f'{img_name}_attention.png'))
            if tb_logger is not None and idx < tb_images:
                self._log_images(tb_logger, dataset_name, img_name, visuals, current_iter)
            row = {'index': idx, 'image': img_name}
            for name, opt_ in metrics_opt.items():
                row[name] = float(calculate_metric(metric_data, opt_))
            row.update(update_ratio=ratio, seconds=seconds)
            stats = getattr(self, 'sparse_stats', None)
            if stats:  # val.sparse: share of the dense network work actually done
                row['sparse_pixels'] = stats['pixels'] / max(1, stats['dense_pixels'])
            rows.append(row)
            del self.lq, self.lq_up, self.output
            if hasattr(self, 'gt'):
                del self.gt
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f'Test {img_name}')
        if pbar is not None:
            pbar.close()
        if world_size > 1:
            from mmengine.dist import all_gather_object
            rows = [r for part in all_gather_object(rows) for r in part]
        rows.sort(key=lambda r: r['index'])  # summation order of a single process: identical means
        count = max(len(rows), 1)
        self.metric_results = {name: sum(r[name] for r in rows) / count for name in metrics_opt}
        self.val_extra = {'update_ratio': sum(r['update_ratio'] for r in rows) / count,
                          'sec_per_image': sum(r['seconds'] for r in rows) / count}
        if rows and all('sparse_pixels' in r for r in rows):
            self.val_extra['sparse_pixels'] = sum(r['sparse_pixels'] for r in rows) / count
        if rank != 0:
            return
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
            for name, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, name, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        get_root_logger().info(
            f'Validation {dataset_name}: YODA pixel-update share vs full diffusion {self.val_extra["update_ratio"]:.4f}; '
            f'sampling {self.val_extra["sec_per_image"]:.2f} s/image ({self.sample_schedule.num_steps} steps'
            + (f', {world_size} ranks' if world_size > 1 else '') + ')'
            + (f'; sparse sampling evaluated {self.val_extra["sparse_pixels"]:.4f} of the dense network pixels'
               if 'sparse_pixels' in self.val_extra else ''))
        if tb_logger is not None:
            for k, v in self.val_extra.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{k}', v, current_iter)
        if not self.opt['is_train']:
            self._write_report(dataset_name, [{k: v for k, v in r.items() if k != 'index'} for r in rows])

    @master_only
    def _write_report(self, dataset_name, rows):
        """Per-image CSV and a summary JSON beside BasicSR's test log."""
        import csv
        import json
        root = self.opt['path'].get('results_root') or self.opt['path']['log']
        os.makedirs(root, exist_ok=True)
        csv_path = osp.join(root, f'metrics_{dataset_name}.csv')
        with open(csv_path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['image'])
            writer.writeheader()
            writer.writerows(rows)
        summary = {'dataset': dataset_name, 'images': len(rows), 'metrics': self.metric_results,
                   'sample_steps': self.sample_schedule.num_steps, 'yoda': self.yoda.as_dict(), **self.val_extra}
        with open(osp.join(root, f'summary_{dataset_name}.json'), 'w', encoding='utf-8') as f:
            json.dump(summary, f, indent=2)
        get_root_logger().info(f'Wrote {csv_path} and summary_{dataset_name}.json')

    def _image_folder(self, dataset_name, img_name, current_iter):
        vis = self.opt['path']['visualization']
        if self.opt['is_train']:
            return osp.join(vis, img_name), str(current_iter)
        suffix = (self.opt.get('val') or {}).get('suffix') or self.opt['name']
        return osp.join(vis, dataset_name), suffix

    @staticmethod
    def _log_images(tb_logger, dataset_name, img_name, visuals, current_iter):
        # One strip per image: bicubic-upsampled LR | SR | HR (| attention).
        tiles = [visuals['lq_up'][0], visuals['result'][0]]
        if 'gt' in visuals:
            tiles.append(visuals['gt'][0])
        if 'attention' in visuals:
            tiles.append(visuals['attention'][0].expand(3, -1, -1))
        tb_logger.add_image(f'images/{dataset_name}/{img_name}', torch.cat(tiles, dim=2).clamp(0, 1), current_iter)

    # -- checkpoints -------------------------------------------------------------------------------
    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's loader with clear errors; ``weights_only=True`` unless ``path.trust_checkpoint: true``."""
        net = self.get_bare_model(net)
        trusted = bool(self.opt['path'].get('trust_checkpoint', False))
        state = load_checkpoint(load_path, weights_only=not trusted)
        if param_key is not None and isinstance(state, dict) and param_key in state:
            state = state[param_key]
        elif param_key is not None and isinstance(state, dict) and 'params' in state:
            get_root_logger().info(f'Loading: {param_key} does not exist in {load_path}, use params.')
            state = state['params']
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f'{load_path} holds no network weights under "{param_key}" (expected a state dict '
                             f'saved by BasicSR: {{"params": ..., "params_ema": ...}})')
        state = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in state.items())
        own = net.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if strict and (missing or unexpected or wrong):
            raise ValueError(
                f'{load_path} does not fit {type(net).__name__} (network_g options or another architecture?): '
                f'{len(missing)} missing key(s) {missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}, '
                f'{len(wrong)} of another shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}')
        if not strict:
            state = OrderedDict((k, v) for k, v in state.items() if k in own and own[k].shape == v.shape)
        net.load_state_dict(state, strict=strict)
        get_root_logger().info(f'Loading {type(net).__name__} model from {load_path}, with param key: [{param_key}].')

    def resume_training(self, resume_state):
        """Optimizers and schedulers (BasicSR), then the random number streams of the saved run."""
        super().resume_training(resume_state)
        if 'rng' in resume_state:
            set_rng_state(resume_state['rng'])
        if 'grad_scaler' in resume_state and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(resume_state['grad_scaler'])

    def save(self, epoch, current_iter):
        super().save(epoch, current_iter)
        if self.opt['dist']:
            self.check_ranks_in_sync(current_iter)

    def check_ranks_in_sync(self, current_iter):
        """All ranks must hold bitwise-identical weights (DDP averages gradients); raise if not."""
        import torch.distributed as dist
        bare = self.get_bare_model(self.net_g)
        sums = torch.stack([p.detach().double().sum() for p in bare.parameters()])
        gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sums)
        worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if worst != 0.0:
            raise RuntimeError(f'ranks out of sync at iteration {current_iter}: parameter checksums differ by {worst}')
        get_root_logger().info(f'Ranks in sync at iteration {current_iter}: identical parameter checksums on '
                               f'{len(gathered)} ranks.')

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's layout (``params`` / ``params_ema``), written atomically."""
        if current_iter == -1:
            current_iter = 'latest'
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, keys):
            state = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((k[7:] if k.startswith('module.') else k, v.cpu()) for k, v in state.items())
        atomic_torch_save(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth'))

    @master_only
    def save_training_state(self, epoch, current_iter):
        """Optimizers, schedulers and iteration, written atomically (after the weights)."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers], 'rng': rng_state()}
        if self.grad_scaler is not None:  # the loss scale found so far (else a resume restarts at 2^16)
            state['grad_scaler'] = self.grad_scaler.state_dict()
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

