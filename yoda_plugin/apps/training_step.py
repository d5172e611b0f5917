"""The model's real training step, measured: what the benchmarks and the GPU check time.

    model = training_model(opt, device)                  # the options' SR3Model / SRDiffModel, built in memory
    data = synthetic_batch(opt, batch_size, device)      # LR, upsampled LR, HR and a Gaussian attention map
    result = time_training_steps(model, data, repeats)   # median seconds of model.optimize_parameters, peak memory

Every timed step is the model's own ``optimize_parameters`` (noising, the
YODA mask, the masked loss, backward, the NaN policy's check, the optimizer
step and the EMA update), so a change to training changes what is measured.
:func:`set_training_variant` switches a built model between precisions
(``train.amp``), memory formats (``train.channels_last``) and YODA on / off
as its options would, without building the network again (seconds for the
paper UNet).
"""
import copy
import statistics
import time
from typing import Optional

import torch

DEFAULT_SCHEDULER = {'type': 'MultiStepLR', 'milestones': [10**9], 'gamma': 1.0}
DEFAULT_PIXEL_LOSS = {'type': 'MaskedNoiseLoss', 'loss_weight': 1.0}
# Sections a training model reads beyond BasicSR's bookkeeping; datasets, logger, path and val stay out
# (nothing is read from disk or written, no metric weights are looked up).
_MODEL_SECTIONS = ('model_type', 'scale', 'network_g', 'diffusion', 'yoda')


def training_options(opt: dict, device, **train) -> dict:
    """A complete option dict for a training model built in memory from the sections of ``opt``.

    Kept: ``model_type``, ``scale``, ``network_g``, ``diffusion``, ``yoda``, the backbone's own section
    (e.g. ``srdiff``) and the ``train`` section's optimizer, scheduler, loss, EMA and NaN policy; ``train``
    keyword arguments (``amp``, ``channels_last``, ``compile``, ``ema_decay``, ...) override it.
    """
    from yoda_plugin.config import backbone_of
    device = torch.device(device)
    out = {k: copy.deepcopy(opt[k]) for k in _MODEL_SECTIONS if k in opt}
    section = backbone_of(opt).section
    if section and section in opt:
        out[section] = copy.deepcopy(opt[section])
    given = copy.deepcopy(dict(opt.get('train') or {}))
    train_opt = {'ema_decay': given.get('ema_decay', 0.999),
                 'optim_g': given.get('optim_g') or {'type': 'AdamW', 'lr': 1e-4},
                 'scheduler': given.get('scheduler') or dict(DEFAULT_SCHEDULER),
                 'pixel_opt': given.get('pixel_opt') or dict(DEFAULT_PIXEL_LOSS),
                 'total_iter': 10**9, 'warmup_iter': -1}
    for key in ('nan_policy', 'nan_skip_limit', 'freeze_rrdb', 'amp', 'channels_last', 'compile'):
        if key in given:
            train_opt[key] = given[key]
    train_opt.update(train)
    out.update(name=str(opt.get('name', 'training_step')), num_gpu=1 if device.type == 'cuda' else 0, dist=False,
               rank=0, world_size=1, is_train=True, path={}, train=train_opt, val={})
    return out


def training_model(opt: dict, device, **train):
    """The options' BasicSR model (``model_type``) in training mode on ``device``; see :func:`training_options`."""
    from basicsr.models import build_model

    import yoda_plugin.models  # noqa: F401  (registers SR3Model and SRDiffModel)
    device = torch.device(device)
    if device.type == 'cuda' and device.index is not None:
        torch.cuda.set_device(device)  # BasicSR's models use the current CUDA device
    return build_model(training_options(opt, device, **train))


def synthetic_batch(opt: dict, batch: int, device, size: Optional[int] = None, seed: int = 0) -> dict:
    """A batch as the dataset gives it: HR (``size``, default ``network_g.image_size``), its LR (area
    downsampling), the bicubic-upsampled LR and the benchmarks' centred Gaussian attention on the HR grid."""
    size = int(size or opt['network_g']['image_size'])
    scale = int(opt['scale'])
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(batch, 3, size, size, generator=g)
    lq = torch.nn.functional.avg_pool2d(gt, scale)
    lq_up = torch.nn.functional.interpolate(lq, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)
    return {'lq': lq.to(device), 'lq_up': lq_up.to(device), 'gt': gt.to(device),
            'attention': gaussian_attention(batch, size, device)}


def gaussian_attention(batch: int, size: int, device) -> torch.Tensor:
    """The centred Gaussian map of the benchmarks (sigma 0.5 on a [-1, 1] grid), (batch, 1, size, size)."""
    axis = torch.linspace(-1, 1, size, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing='ij')
    return torch.exp(-(yy**2 + xx**2) / (2 * 0.5**2))[None, None].expand(batch, 1, -1, -1).contiguous()


def set_training_variant(model, amp: Optional[str] = None, channels_last: bool = False, yoda: bool = True):
    """Train a built model with ``train.amp: amp`` (fp16: with a GradScaler), ``train.channels_last`` and YODA
    on (its options' ``yoda`` section) or off, as a model built with those options would."""
    from yoda_plugin.config import FastPaths
    from yoda_plugin.core import YODAConfig
    original = model.__dict__.setdefault('_variant_yoda', model.yoda)
    model.yoda = original if yoda else YODAConfig(enabled=False)
    model.train_fast = FastPaths(amp=amp, channels_last=channels_last, phase='train')
    model.grad_scaler = torch.amp.GradScaler(model.device.type) if amp == 'fp16' else None
    net = model.get_bare_model(model.net_g)
    net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    net._yoda_channels_last = channels_last  # the adapter feeds inputs in the network's format
    return model


def sync(device):
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_training_steps(model, data: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of ``repeats`` calls of ``model.optimize_parameters`` on ``data`` after ``warmup`` untimed
    ones (allocator, kernels, optimizer state), the peak CUDA memory of them all (GiB; None on the CPU), the
    last loss and the network's parameters (millions)."""
    device = model.device
    model.feed_data(data)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        model.optimize_parameters(i + 1)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    loss = float(model.log_dict['l_pix'])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    net = model.get_bare_model(model.net_g)
    return {'step_s': statistics.median(times), 'times': times, 'peak_gib': peak, 'loss': loss,
            'params_m': sum(p.numel() for p in net.parameters()) / 1e6}
