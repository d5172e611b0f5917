"""The BasicSR model machinery shared by every diffusion backbone (SR3, SRDiff), with and without YODA.

:class:`DiffusionSRModel` (abstract, not registered) does everything that
does not depend on the backbone: option sections (:mod:`.sections`), the
training schedule, fast paths (channels_last, torch.compile, amp with a
GradScaler for fp16), the training step (Eq. 3, 9-11 via
:func:`~yoda_plugin.core.yoda.training_inputs`, the masked loss Eq. 10, NaN
policy, EMA), sampling through one :class:`~yoda_plugin.core.pipeline.DiffusionSR`
(``self.pipeline``: padding, tiles, sparse crops, YODA blend, sampler),
validation (:mod:`.validation`) and checkpoints (:mod:`.checkpoint`).

A backbone subclass names its backbone (``backbone``: a name registered in
:data:`~yoda_plugin.core.adapters.BACKBONES`); the adapter class holds its
space, network calls, size multiple, diffusion defaults and option section.
Training-only settings stay in the subclass, optionally with
:meth:`prepare_network` (e.g. freezing) and :meth:`describe`.
"""
from collections import OrderedDict
from dataclasses import asdict

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from torch.nn.parallel import DataParallel, DistributedDataParallel

from yoda_plugin.config import (DEFAULT_NAN_SKIP_LIMIT, NAN_POLICIES, apply_fast_paths, option_sections,
                                pipeline_from_sections)
from yoda_plugin.core import get_backbone, training_inputs
from yoda_plugin.core.pipeline import DiffusionSR

from .checkpoint import CheckpointMixin
from .validation import ValidationMixin


def total_norm(tensors) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together: non-finite exactly when one of them has a NaN or Inf."""
    norms = torch._foreach_norm(tensors) if hasattr(torch, '_foreach_norm') else [t.norm() for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def ema_decay_at(decay: float, iteration: int, warmup: bool) -> float:
    """The EMA decay of a step: ``decay``, or with ``warmup`` min(decay, (1 + n) / (10 + n)) at iteration n
    (TensorFlow's ExponentialMovingAverage with ``num_updates``, as latent diffusion's EMA uses it), so early EMA
    weights follow the network."""
    return min(decay, (1 + iteration) / (10 + iteration)) if warmup else decay


class DiffusionSRModel(CheckpointMixin, ValidationMixin, SRModel):
    """Diffusion SR with YODA on or off (the ``yoda`` section); see the module docstring.

    Options on top of BasicSR's SRModel (declared in :mod:`yoda_plugin.config`):
        diffusion: schedule, num_timesteps (T_train), linear_start, linear_end, cosine_s,
            sample_steps (T_eval), variance (posterior|beta), clip_denoised, continuous_noise_level,
            prediction (eps|v: what the network predicts).
        yoda: enabled, lower_bound, lr_noise (auto|marginal|fixed|posterior), mask_network_input.
            Absent or ``enabled: false``: vanilla diffusion.
        train.ema_warmup: false (default, BasicSR's EMA) or true: the EMA decay at iteration n is
            min(ema_decay, (1 + n) / (10 + n)), so early EMA weights do not keep most of the random initialisation.
        train.nan_policy: ``raise`` (default) stops on a non-finite loss or gradient naming the iteration;
            ``skip`` drops that step, and stops after ``train.nan_skip_limit`` (default 10) consecutive skipped
            steps. Weights that turn non-finite after a step always stop the run, and no checkpoint with
            non-finite weights is ever written.
        train/val.amp: autocast dtype of the network, null (float32), ``bf16`` or ``fp16`` (training with a
            GradScaler, its state saved in the training state); the loss and the diffusion arithmetic stay
            float32. train/val.channels_last, train/val.compile: fast paths of the trained / sampling network.
        val.sampler: type (ddpm|ddim|dpmpp_2m), steps (null: diffusion.sample_steps), eta (DDIM only).
        val.sparse (YODA only), val.tile_size / tile_overlap / tile_margin (HR pixels; null size: whole image).
        val.sample_seed: image i uses seed + i, so validations at different iterations are comparable.
        val.progress, val.tb_images, val.save_attention: progress bar, tensorboard images, attention maps.
    """
    backbone = None  # a registered backbone name ('sr3', 'srdiff'): yoda_plugin.core.adapters.BACKBONES
    frozen_note = ''  # what the frozen parameters are (log)
    # Option keys read beyond BasicSR's own (sections: '' top level, 'train', 'path'); tests/test_options.py
    # accepts them, merged along the class hierarchy.
    extra_option_keys = {'train': {'nan_policy', 'nan_skip_limit', 'amp', 'channels_last', 'compile', 'ema_warmup'},
                         'path': {'trust_checkpoint'}}

    def __init__(self, opt):
        self.adapter_cls = get_backbone(self.backbone)
        self.parse_options(opt)  # every section checked before a network is built
        super().__init__(opt)
        # fp16 gradients underflow without loss scaling; None: no scaler (float32 or bf16 training).
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.train_fast.amp == 'fp16' else None
        if self.device.type != 'cuda' and 'fp16' in (self.train_fast.amp, self.val_opt.fast.amp):
            get_root_logger().warning('amp: fp16 on the CPU has no fast kernels (a training step of the paper UNet '
                                      'took 92x the float32 time here); use bf16 on the CPU')
        self._apply_fast_paths()
        self.check_network(self.get_bare_model(self.net_g))
        for metric in (self.val_opt.metrics or {}).values():
            if metric.get('type') == 'calculate_lpips':  # a missing backbone fails now, not after sampling
                from yoda_plugin.metrics.lpips_metric import resolve_alexnet_weights
                resolve_alexnet_weights(metric.get('weights'))
        self.pipeline = self.build_pipeline()
        tiling = self.pipeline.tiling
        get_root_logger().info(
            f'{type(self).__name__}: train {self.schedule}; sampler {self.sampler_label()} '
            f'({self.pipeline.sampler!r}); YODA: {self.yoda.as_dict() if self.yoda.enabled else "off (vanilla)"}; '
            f'sampling tiles: {asdict(tiling) if tiling.enabled else "off (whole image)"}; '
            f'sparse: {asdict(self.pipeline.sparse) if self.pipeline.sparse.enabled else "off"}; '
            f'pad to {self.pipeline.pad_multiple}; colour fix: {self.pipeline.colour_fix or "off"}' + self.describe())

    # -- the backbone, and hooks of the subclasses ------------------------------------------------
    def make_adapter(self, net, schedule, amp_dtype, channels_last):
        """The backbone's adapter for ``net`` and the fed batch (training: no per-image precomputation)."""
        return self.adapter_cls.for_batch(net, schedule, self.lq, self.lq_up, self.opt['scale'], amp_dtype,
                                          channels_last, encode=False, **self.backbone_opts)

    def check_network(self, net):
        """Raise if ``network_g`` does not fit this model."""
        self.adapter_cls.check_network(net, self.opt['scale'])

    def prepare_network(self, net):
        """Called on the trained network before the fast paths and any DDP wrap (e.g. freezing)."""

    def describe(self) -> str:
        return ''

    # -- options -----------------------------------------------------------------------------------
    @classmethod
    def option_sections(cls, opt: dict) -> dict:
        """Every option section this model reads, built once (errors name ``<section>.<key>``); the keys are
        the attribute names the model keeps them under (:func:`yoda_plugin.config.option_sections`)."""
        return option_sections(cls.backbone, opt)

    def parse_options(self, opt):
        for name, section in self.option_sections(opt).items():
            setattr(self, name, section)
        train_opt = opt.get('train') or {}
        self.nan_policy = train_opt.get('nan_policy', 'raise')
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f'train.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}')
        self.nan_skip_limit = train_opt.get('nan_skip_limit', DEFAULT_NAN_SKIP_LIMIT)
        if isinstance(self.nan_skip_limit, bool) or not isinstance(self.nan_skip_limit, int) or self.nan_skip_limit < 1:
            raise ValueError(f'train.nan_skip_limit must be a positive integer (consecutive skipped steps before the '
                             f'run stops), got {self.nan_skip_limit!r}')
        self.skipped_in_a_row = 0
        self.ema_warmup = train_opt.get('ema_warmup', False)
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f'train.ema_warmup must be true or false, got {self.ema_warmup!r}')
        self.schedule = self.diffusion.training_schedule()

    # -- devices, fast paths and optimisers --------------------------------------------------------
    def model_to_device(self, net):
        """As BasicSR's, but DistributedDataParallel also on CPU (gloo), after the fast-path options."""
        net = net.to(self.device)
        self.prepare_network(net)  # before any DistributedDataParallel wrap
        self._apply_fast_paths(net, 'train' if self.is_train else 'val')
        if self.opt['dist']:
            find_unused = self.opt.get('find_unused_parameters', False)
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def _apply_fast_paths(self, net=None, phase=None):
        """``train.channels_last`` / ``train.compile`` for the trained network, ``val.*`` for the sampling one
        (:func:`yoda_plugin.config.apply_fast_paths`, on the backbone's ``compile_method``): before any DDP wrap (from
        ``model_to_device``), and on the EMA copy after construction (``net`` None)."""
        if net is None:
            if hasattr(self, 'net_g_ema'):
                self._apply_fast_paths(self.net_g_ema, 'val')
            return
        apply_fast_paths(net, self.train_fast if phase == 'train' else self.val_opt.fast,
                         self.adapter_cls.compile_method)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` optimizer by name (the paper: AdamW)."""
        cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f'train.optim_g.type: {optim_type!r} is not a torch.optim optimizer (e.g. AdamW, Adam)')
        return cls(params, lr, **kwargs)

    def setup_optimizers(self):
        """BasicSR's for the trainable parameters, with one log line for the frozen ones instead of a warning each."""
        net = self.get_bare_model(self.net_g)
        params = [p for p in net.parameters() if p.requires_grad]
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        get_root_logger().info(f'Optimising {sum(p.numel() for p in params):,} parameters'
                               + (f'; {frozen:,} frozen ({self.frozen_note})' if frozen else ''))
        optim_opt = dict(self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_g = self.get_optimizer(optim_type, params, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def model_ema(self, decay=0.999):
        super().model_ema(decay)
        # Frozen weights stay bitwise equal in the EMA copy (decay * w + (1 - decay) * w may round).
        ema = dict(self.net_g_ema.named_parameters())
        with torch.no_grad():
            for name, p in self.get_bare_model(self.net_g).named_parameters():
                if not p.requires_grad:
                    ema[name].copy_(p)

    # -- data --------------------------------------------------------------------------------------
    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)
        self.lq_up = data['lq_up'].to(self.device) if 'lq_up' in data else torch.nn.functional.interpolate(
            self.lq, scale_factor=self.opt['scale'], mode='bicubic', align_corners=False).clamp(0, 1)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)
        self.attention = data['attention'].to(self.device) if 'attention' in data else None
        if self.yoda.enabled and self.attention is None:
            raise ValueError('YODA is enabled (yoda.enabled: true) but the dataset returns no attention map: use '
                             'datasets.<phase>.type: YODAPairedDataset with dataroot_attention (BasicSR\'s datasets, '
                             'e.g. PairedImageDataset, return none), or yoda: {enabled: false}')

    # -- training ----------------------------------------------------------------------------------
    def train_adapter(self):
        """The adapter around the trained network, under ``train.amp``; its calls go through the DDP wrapper."""
        bare = self.get_bare_model(self.net_g)
        adapter = self.make_adapter(bare, self.schedule, self.train_fast.amp_dtype,
                                    getattr(bare, '_yoda_channels_last', False))
        adapter.net = self.net_g  # gradients are synchronised in the wrapper's forward
        return adapter

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        adapter = self.train_adapter()
        x0 = adapter.to_space(self.gt)
        mask = self.yoda.mask(self.attention, self.schedule.num_train_timesteps)
        inputs = training_inputs(self.schedule, x0, mask, self.yoda.mask_network_input, None,
                                 self.diffusion.continuous_noise_level)
        prediction = adapter.training_output(inputs)  # eps, or v (diffusion.prediction)
        l_pix = self.cri_pix(prediction, inputs['target'], inputs['mask'])
        self.apply_loss(l_pix, inputs['mask'], current_iter)

    def apply_loss(self, l_pix, mask, current_iter):
        """NaN policy, backward (GradScaler with fp16), optimizer step, loss log and EMA update.

        Checked every step, with one decision for all ranks (gradients are averaged across ranks before the
        check; the flag is reduced): a non-finite loss or gradient is skipped or raised by ``train.nan_policy``
        (without fp16's GradScaler one host synchronisation covers both); weights that are non-finite after the
        step stop the run (nothing is saved).
        """
        params = [p for p in self.get_bare_model(self.net_g).parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            if not self._all_ranks_finite(l_pix.detach()):
                return self._non_finite_step(f'non-finite training loss ({l_pix.item()})', current_iter)
            # The scaler skips steps whose scaled gradients overflow (and lowers the scale): fp16's own policy.
            self.grad_scaler.scale(l_pix).backward()
            self.grad_scaler.step(self.optimizer_g)
            self.grad_scaler.update()
        else:
            # Backward first, so that one check (one host synchronisation) covers the loss and the gradients: a
            # non-finite loss makes the gradients non-finite too, and DDP has averaged them across ranks.
            if l_pix.requires_grad:  # a constant (non-finite) loss has nothing to propagate
                l_pix.backward()
            grads = [p.grad for p in params if p.grad is not None]
            checked = [l_pix.detach().float().reshape(1)] + ([total_norm(grads).reshape(1)] if grads else [])
            if not self._all_ranks_finite(torch.cat(checked)):
                what = (f'non-finite gradients (loss {l_pix.item():.6g} is finite)' if bool(torch.isfinite(l_pix))
                        else f'non-finite training loss ({l_pix.item()})')
                return self._non_finite_step(what, current_iter)
            self.optimizer_g.step()
        if params and not bool(torch.isfinite(total_norm([p.detach() for p in params]))):
            raise FloatingPointError(
                f'the weights are non-finite after the optimizer step at iteration {current_iter} (the loss '
                f'{l_pix.item():.6g} and its gradients were finite): the run stops before any checkpoint of them is '
                f'written; lower train.optim_g.lr or resume from the last checkpoint (--auto_resume)')
        self.skipped_in_a_row = 0
        loss_dict = OrderedDict(l_pix=l_pix.detach())
        if mask is not None:
            loss_dict['mask_ratio'] = mask.mean().detach()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=ema_decay_at(self.ema_decay, current_iter, self.ema_warmup))

    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        """``value`` is finite on every rank (one flag reduced across a distributed run)."""
        finite = torch.isfinite(value).all().to(torch.float32).reshape(1)
        if self.opt.get('dist'):
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def _non_finite_step(self, what: str, current_iter):
        """``train.nan_policy``: drop this step (up to ``train.nan_skip_limit`` in a row) or stop."""
        self.optimizer_g.zero_grad(set_to_none=True)
        msg = f'{what} at iteration {current_iter}'
        if self.nan_policy != 'skip':
            raise FloatingPointError(msg + '; weights were not updated. Lower the learning rate or set '
                                     'train.nan_policy: skip')
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.nan_skip_limit:
            raise FloatingPointError(
                f'{msg}: {self.skipped_in_a_row} steps in a row skipped (train.nan_skip_limit: {self.nan_skip_limit}); '
                f'the run has diverged and stops (weights of the last checkpoint are finite; lower train.optim_g.lr '
                f'and resume with --auto_resume)')
        get_root_logger().warning(f'{msg}: step skipped (train.nan_policy: skip; {self.skipped_in_a_row} in a row, '
                                  f'the run stops at {self.nan_skip_limit})')
        self.log_dict = OrderedDict(l_pix=float('nan'), skipped=1.0)

    # -- sampling ----------------------------------------------------------------------------------
    def sampling_net(self):
        """The network that samples: the EMA copy when training keeps one, else the trained network."""
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)

    def build_pipeline(self, **overrides) -> DiffusionSR:
        """The ``DiffusionSR`` of the options (``overrides``: its keyword arguments, e.g. ``tiling``)."""
        return pipeline_from_sections(self.sampling_net(), self.adapter_cls, self.opt['scale'], self.diffusion,
                                      self.yoda, self.val_opt, self.backbone_opts, self.schedule, **overrides)

    @property
    def sample_schedule(self):
        """The sampling grid (the training schedule respaced to the sampler's steps)."""
        return self.pipeline.sampler.schedule

    @property
    def align(self) -> int:
        """HR sizes are padded to a multiple of this (the network's size multiple and the scale)."""
        return self.pipeline.pad_multiple

    def sampling_generator(self, seed):
        """A generator on the model's device seeded with ``seed`` (None: the global RNG)."""
        if seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        return generator

    @torch.no_grad()
    def sample(self, seed=None, progress=False, callback=None):
        """Super-resolve the fed batch; returns images in [0, 1].

        ``callback(k, z, mask)`` sees every step's state in the backbone's space (padded image).
        """
        net = self.pipeline.net
        was_training = net.training
        net.eval()
        try:
            out, info = self.pipeline(self.lq, self.lq_up, self.attention, self.sampling_generator(seed), callback,
                                      progress)
        finally:
            if was_training:
                net.train()
        self.sparse_stats = info['sparse_stats']
        return out

    def test(self, seed=None):
        self.output = self.sample(seed=seed, progress=bool(self.val_opt.progress))

    def update_ratio(self):
        """YODA's share of pixel updates versus full diffusion for the fed batch (1.0 when off)."""
        return self.pipeline.update_ratio(self.attention)

    def checkpoint_record(self) -> dict:
        """What ``net_g_*.pth`` records beside its weights (:mod:`yoda_plugin.checkpoints.record`): the options
        that rebuild network and pipeline, and the run and iteration that made them."""
        from ..checkpoints.record import make_record
        return make_record(self.opt, training={'name': self.opt.get('name'),
                                               'iteration': getattr(self, 'last_iter', None)})

    def get_current_visuals(self):
        out = OrderedDict(lq=self.lq.detach().cpu(), lq_up=self.lq_up.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'gt'):
            out['gt'] = self.gt.detach().cpu()
        if self.attention is not None:
            out['attention'] = self.attention.detach().cpu()
        return out
