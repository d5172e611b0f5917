"""The sampling pipeline shared by the BasicSR models, the inference API, the scripts and the benchmarks.

``super_resolve(adapter, sampler, yoda, attention, sparse, tiling)`` wires the
pieces: the adapter's ``net_fn`` (optionally tiled, :mod:`.tiling`), the
sparse denoiser (YODA only, :mod:`.sparse`), the YODA blend around the
sampler (:class:`.yoda.YODASampler`) and the loop (:func:`.samplers.sample`).
:func:`pad_inputs` pads LR, upsampled LR and attention so the HR size is a
multiple of the network's; callers crop the output back.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .adapters import get_backbone, lcm
from .colour_fix import apply_colour_fix, check_colour_fix
from .samplers import SamplerConfig, sample
from .sparse import SparseConfig
from .tiling import TilingConfig
from .yoda import YODAConfig


def pad_bottom_right(x: torch.Tensor, bottom: int, right: int, mode: str) -> torch.Tensor:
    if not bottom and not right:
        return x
    if mode == 'reflect' and (bottom >= x.shape[2] or right >= x.shape[3]):
        mode = 'replicate'  # reflection needs the pad to be smaller than the image
    return F.pad(x, (0, right, 0, bottom), mode=mode)


def pad_inputs(lq: torch.Tensor, lq_up: torch.Tensor, attention: Optional[torch.Tensor], align: int,
               scale: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Pad (bottom/right) so the HR size is a multiple of ``align``: images by reflection, attention by replication.

    ``align`` must be a multiple of ``scale`` (so the LR pad is whole pixels).
    """
    H, W = lq_up.shape[-2:]
    if (H, W) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
        raise ValueError(f'LR {tuple(lq.shape[-2:])} x scale {scale} does not match the upsampled LR {(H, W)}')
    Hp, Wp = -(-H // align) * align, -(-W // align) * align
    lq = pad_bottom_right(lq, (Hp - H) // scale, (Wp - W) // scale, 'reflect')
    lq_up = pad_bottom_right(lq_up, Hp - H, Wp - W, 'reflect')
    if attention is not None:
        attention = pad_bottom_right(attention, Hp - H, Wp - W, 'replicate')
    return lq, lq_up, attention


@torch.no_grad()
def super_resolve(adapter, sampler, yoda: YODAConfig, attention: Optional[torch.Tensor],
                  sparse: Optional[SparseConfig] = None, tiling: Optional[TilingConfig] = None,
                  generator: Optional[torch.Generator] = None, callback=None,
                  progress: bool = False) -> Tuple[torch.Tensor, dict]:
    """Sample z_0 in the adapter's space; returns ``(z_0, info)``: ``info['sparse_stats']`` (None unless sparse
    ran) and ``info['tiles']`` (tiles of the whole image).

    ``sampler`` is a plain sampler (its grid: ``sampler.schedule``, which the
    adapter must share); YODA wraps it here when ``yoda.enabled``.
    """
    H, W = adapter.lr_mean.shape[-2:]
    net_fn = (tiling or TilingConfig()).net_fn(adapter.net_fn, H, W, adapter.multiple)
    wrapped = yoda.wrap(sampler, attention, adapter.lr_mean)
    stats = None
    if sparse is not None and sparse.enabled and wrapped is not sampler:
        denoiser = sparse.denoiser(net_fn, adapter.multiple)
        stats = denoiser.stats
    else:
        def denoiser(z_in, k, mask):
            return net_fn(z_in, k)
    z = sample(denoiser, wrapped, adapter.lr_mean, generator, callback, progress)
    return z, {'sparse_stats': stats, 'tiles': getattr(net_fn, 'num_tiles', 1)}


class DiffusionSR:
    """A diffusion SR network with its settings: ``sr, info = pipe(lq, lq_up, attention, generator)``.

    The one object that samples, for every registered backbone
    (:data:`~.adapters.BACKBONES`: ``'sr3'`` in image space, ``'srdiff'`` in
    residual space): the BasicSR models, :class:`yoda_plugin.YODAResolver`,
    the scripts and the benchmarks all sample through it. ``backbone`` is a
    registered name or adapter class; ``schedule`` is the training schedule;
    ``sampler`` a :class:`~.samplers.SamplerConfig` whose
    ``steps`` default to ``default_steps`` (``diffusion.sample_steps``);
    ``variance`` is DDPM's; ``clip`` clips the predicted x0 to [-1, 1];
    ``backbone_options`` go to the adapter (SRDiff: ``res_rescale``,
    ``clip_input``, ``time_offset``). Inputs are padded to the network's size
    multiple and the output cropped back. ``colour_fix`` (None, ``'wavelet'``,
    ``'adain'``; :mod:`.colour_fix`) corrects the whole sampled image against
    ``lq_up`` (after tiling, once). ``info`` holds the sparse counters
    (``sparse_stats``, None when sparse sampling did not run), the number of tiles, the sampler and the
    colour fix.
    """

    def __init__(self, net, backbone, schedule, scale: int, yoda: YODAConfig, sampler=None,
                 default_steps: Optional[int] = None, variance: str = 'posterior', clip: bool = True,
                 sparse: Optional[SparseConfig] = None, tiling: Optional[TilingConfig] = None,
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                 backbone_options: Optional[dict] = None, colour_fix: Optional[str] = None):
        self.adapter_cls = get_backbone(backbone)
        self.net, self.backbone, self.scale, self.yoda = net, self.adapter_cls.name, scale, yoda
        self.sampler_config = sampler if sampler is not None else SamplerConfig()
        self.sampler = self.sampler_config.build(schedule, default_steps, (-1.0, 1.0) if clip else None, variance)
        self.sparse, self.amp_dtype, self.channels_last = sparse or SparseConfig(), amp_dtype, channels_last
        self.backbone_options = dict(backbone_options or {})
        self.colour_fix = check_colour_fix(colour_fix)
        # Crops and tiles align to the network's size multiple; padding also to the scale (whole LR pixels).
        self.multiple = self.adapter_cls.size_multiple(net, scale)
        self.pad_multiple = lcm(self.multiple, scale)
        self.tiling = (tiling or TilingConfig()).checked(self.multiple)

    @property
    def steps(self) -> int:
        return self.sampler.num_steps

    def adapter(self, lq: torch.Tensor, lq_up: torch.Tensor):
        return self.adapter_cls.for_batch(self.net, self.sampler.schedule, lq, lq_up, self.scale, self.amp_dtype,
                                          self.channels_last, **self.backbone_options)

    def update_ratio(self, attention: Optional[torch.Tensor]) -> torch.Tensor:
        """YODA's share of pixel updates versus full diffusion on this sampler's grid, per image (1 when off)."""
        mask = self.yoda.mask(attention, self.sampler.schedule.num_train_timesteps)
        if mask is None:
            return torch.ones(1 if attention is None else attention.shape[0], dtype=torch.float64)
        return mask.update_ratio(self.sampler.schedule.timesteps).cpu()

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, lq_up: torch.Tensor, attention: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, callback=None, progress: bool = False):
        """SR images in [0, 1] for LR ``lq`` and its upsampled ``lq_up`` (both [0, 1]) and attention on the HR grid."""
        if self.yoda.enabled and attention is None:
            raise ValueError('YODA is enabled (yoda.enabled: true) but no attention map was given')
        H, W = lq_up.shape[-2:]
        lq_p, lq_up_p, att_p = pad_inputs(lq, lq_up, attention if self.yoda.enabled else None,
                                          self.pad_multiple, self.scale)
        adapter = self.adapter(lq_p, lq_up_p)
        z, info = super_resolve(adapter, self.sampler, self.yoda, att_p, self.sparse, self.tiling, generator,
                                callback, progress)
        out = apply_colour_fix(self.colour_fix, adapter.to_image(z)[..., :H, :W], lq_up)
        return out, {**info, 'sampler': self.sampler, 'colour_fix': self.colour_fix}
