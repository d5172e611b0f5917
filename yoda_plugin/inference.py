"""``YODAResolver``: one inference object for SR3 / SRDiff, with or without YODA (after Real-ESRGAN's RealESRGANer).

    from yoda_plugin import YODAResolver
    sr = YODAResolver.from_checkpoint('net_g_latest.pth')      # the checkpoint's record: no option file
    sr = YODAResolver.from_options('options/test_sr3_yoda.yml', 'net_g_latest.pth',
                                   sampler={'type': 'dpmpp_2m', 'steps': 20})
    out = sr(lr)                       # lr: RGB uint8 (h, w, 3), or a list of them, or a (B, 3, h, w) tensor
    out = sr(lr, attention=a, seed=0)  # a: the LR-grid or HR-grid map in [0, 1]; default: computed on the fly

Each LR image is upsampled to the HR grid the way the option file's dataset
does it (``resize``: Pillow or OpenCV bicubic for uint8 images; PyTorch
bicubic for float tensors), its attention map is computed on the LR image with
the configured source (``attention_source`` or the dataset's recorded
``attention_meta`` source) and resized bilinearly to the HR grid, exactly as
the training data were prepared; then the model's :class:`DiffusionSR`
pipeline samples. Sampler, sparse sampling, tiling, device, amp and the
colour fix (``colour_fix='wavelet'`` or ``'adain'``: the sampled image's colours
corrected against the upsampled LR, :mod:`yoda_plugin.core.colour_fix`) are
options of the object; nothing is written into any model's options.

:meth:`YODAResolver.from_checkpoint` needs no option file: a checkpoint the
project wrote carries the record of its options (:mod:`yoda_plugin.checkpoints.record`).

The defaults every front end shares (this API, ``python -m yoda_plugin sr``,
``scripts/inference_yoda.py``) are defined here once: :data:`DEFAULT_SEED`,
:data:`DEFAULT_PARAM_KEY`, :func:`default_tiling` (the option file's
``val.tile_size``, else the training size ``network_g.image_size``: larger images
are sampled in blended tiles of that size), the sampler and steps of the options'
``val.sampler`` (else DDPM on ``diffusion.sample_steps``) and the colour fix of
``val.colour_fix`` (else none).

It needs the networks (:mod:`yoda_plugin.archs`), the core, the attention
sources and the option sections of :mod:`yoda_plugin.config`; no training
class: the option file's ``model_type`` names the backbone
(:func:`yoda_plugin.config.backbone_of`).
"""
import copy
import os
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .core import DiffusionSR, check_attention

ImageLike = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]

# -- the defaults of every front end, defined once ---------------------------------------------------------------
DEFAULT_SEED = 0  # the sampling seed (a list of images: image i uses seed + i in the API)
DEFAULT_PARAM_KEY = 'params_ema'  # the EMA weights


def default_tiling(opt: dict) -> Optional[dict]:
    """The tiling the resolver uses unless told otherwise: None (the option file's ``val.tile_size``) when the
    options set one, else tiles of the training size ``network_g.image_size`` (overlap a quarter tile, both
    rounded to the network's size multiple); None (whole image) for a network without an ``image_size``."""
    if (opt.get('val') or {}).get('tile_size'):
        return None
    size = (opt.get('network_g') or {}).get('image_size')
    return {'tile_size': int(size), 'tile_overlap': None, 'round': True} if size else None


def tiling_setting(opt: dict, tile: Optional[int] = None, tile_overlap: Optional[int] = None) -> Optional[dict]:
    """``tiling=`` for :meth:`YODAResolver.from_network` from a tile size (None: :func:`default_tiling`; 0: whole
    image) and an overlap (None: a quarter tile)."""
    if tile == 0:
        return {'tile_size': None}
    if tile is None:
        tiling = default_tiling(opt)
        if tiling is None:
            val = opt.get('val') or {}
            tiling = ({'tile_size': val['tile_size'], 'tile_overlap': val.get('tile_overlap'), 'round': True}
                      if val.get('tile_size') else None)
        if tiling is None or tile_overlap is None:
            return tiling
        return {**tiling, 'tile_overlap': tile_overlap}
    return {'tile_size': int(tile), 'tile_overlap': tile_overlap, 'round': True}


def sampler_setting(opt: dict, sampler: Optional[str] = None, steps: Optional[int] = None,
                    eta: Optional[float] = None) -> Optional[dict]:
    """``sampler=`` for :meth:`YODAResolver.from_network` from a sampler name, steps and DDIM eta, each None
    for the options' ``val.sampler`` (else DDPM on ``diffusion.sample_steps``); None when all are None."""
    if sampler is None and steps is None and eta is None:
        return None
    config = {'type': sampler} if sampler else dict((opt.get('val') or {}).get('sampler') or {})
    if steps is not None:
        config['steps'] = steps
    if eta is not None:
        config['eta'] = eta
    return config


def resolve_device(device) -> torch.device:
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'device {device}: CUDA is not available on this machine (use device="cpu")')
    return device


class YODAResolver:
    """Super-resolve LR images: ``resolver(lr_images, attention=None, seed=0)``.

    Built from a :class:`~yoda_plugin.core.pipeline.DiffusionSR` (a network
    and its settings) with :meth:`from_network`, or from an option file and a
    checkpoint with :meth:`from_options`. ``attention_source`` is an
    :class:`~yoda_plugin.attention.AttentionSource` (or None: YODA off, or
    maps always given by the caller).
    """

    def __init__(self, pipeline: DiffusionSR, attention_source=None, resize: str = 'pil', device='cpu'):
        self.pipeline, self.attention_source, self.resize = pipeline, attention_source, resize
        self.device = resolve_device(device)
        self.scale = pipeline.scale
        pipeline.net.to(self.device).eval()
        self.last_info = None
        self.record, self.notes, self.checkpoint = None, [], None
        if pipeline.sparse.enabled and not pipeline.yoda.enabled:
            self.notes.append(SPARSE_WITHOUT_YODA)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_network(cls, net, opt: dict, device='cpu', attention_source=None, **overrides) -> 'YODAResolver':
        """A resolver for ``net`` (weights already loaded) with the ``diffusion`` / ``yoda`` / ``val`` sections of
        ``opt``; ``overrides``: ``sampler``, ``sparse``, ``tiling``, ``amp``, ``channels_last``, ``colour_fix``
        (``wavelet``, ``adain``, ``none``), ``sample_steps`` (each as in the ``val`` section), ``resize``,
        ``yoda`` (True / False: YODA on or off; a dict: the ``yoda`` section). The options are taken as they are
        (tiles only where ``val.tile_size`` says): the benchmarks time whole images through it;
        :meth:`from_checkpoint` and :meth:`from_options` add the shared defaults (:func:`default_tiling`)."""
        from .config import build_pipeline
        opt = dict(opt)
        yoda = overrides.pop('yoda', None)
        if isinstance(yoda, bool):
            opt['yoda'] = {**(opt.get('yoda') or {}), 'enabled': yoda}
        elif yoda is not None:
            opt['yoda'] = dict(yoda)
        resize = overrides.pop('resize', None) or dataset_resize(opt)
        pipeline = build_pipeline(net, opt, **overrides)
        if attention_source is None and pipeline.yoda.enabled:
            attention_source = attention_source_for(opt, device)
        return cls(pipeline, attention_source, resize, device)

    @classmethod
    def from_options(cls, opt, checkpoint: Optional[str] = None, param_key: str = DEFAULT_PARAM_KEY, device=None,
                     attention_source=None, trust_checkpoint: bool = False, **overrides) -> 'YODAResolver':
        """Build the option file's ``network_g``, load ``checkpoint`` (default: ``path.pretrain_network_g``)
        with ``weights_only=True`` (``trust_checkpoint`` or the options' ``path.trust_checkpoint: true`` to allow
        pickled objects), and wrap it. A checkpoint whose record disagrees with the options on what defines the
        weights (``network_g``, ``scale``, the training schedule) is refused naming the keys; other differences
        (YODA, sample steps, attention source) are listed in ``notes``."""
        from .utils.options import load_options
        where = f'the option file {opt}' if isinstance(opt, str) else 'the options'
        opt = load_options(opt) if isinstance(opt, str) else copy.deepcopy(opt)
        checkpoint = checkpoint or (opt.get('path') or {}).get('pretrain_network_g')
        if not checkpoint:
            raise ValueError(f"no checkpoint: pass one or set path.pretrain_network_g in {where}")
        trusted = bool(trust_checkpoint) or bool((opt.get('path') or {}).get('trust_checkpoint', False))
        return cls.from_checkpoint(checkpoint, param_key=param_key, device=device, attention_source=attention_source,
                                   trust_checkpoint=trusted, opt=opt, opt_name=where, **overrides)

    @classmethod
    def from_checkpoint(cls, path: str, param_key: str = DEFAULT_PARAM_KEY, device=None, attention_source=None,
                        trust_checkpoint: bool = False, opt: Optional[dict] = None, opt_name: str = 'the options',
                        **overrides) -> 'YODAResolver':
        """A resolver for the checkpoint ``path`` alone: network and pipeline are rebuilt from the record it
        carries (``yoda_record``: training's ``net_g_*.pth``, the demo's models, ``convert_checkpoint.py``'s
        output). ``opt`` (an option dict) replaces the record: an older checkpoint without one needs it.
        ``overrides`` as :meth:`from_network`'s. ``resolver.record`` is the record (None without one),
        ``resolver.notes`` the differences between ``opt`` and the record that were let through."""
        from .archs import build_network
        from .checkpoints import load_network_weights
        from .checkpoints.public import missing_published_weights
        from .checkpoints.record import (RecordError, defines_weights, describe_differences, record_differences,
                                         record_of, record_options)
        from .utils.torch_io import load_checkpoint
        if not os.path.isfile(path):
            raise missing_published_weights(path) or FileNotFoundError(f'checkpoint not found: {path}')
        loaded = load_checkpoint(path, weights_only=not trust_checkpoint)
        record = record_of(loaded, path)
        notes = []
        if opt is None:
            if record is None:
                raise RecordError(f'{path} carries no record of its options (written before checkpoints recorded '
                                  f'them, or a published file: convert it with scripts/convert_checkpoint.py): pass '
                                  f'the option file it was trained with (--opt OPTIONS, or YODAResolver.from_options)')
            opt = record_options(record)
        elif record is not None:
            differ = record_differences(record, opt)
            hard = [d for d in differ if defines_weights(d[0])]
            if hard:
                raise RecordError(f'the record in {path} and {opt_name} differ on what the weights were trained '
                                  f'with: {describe_differences(hard)}; drop the option file to use the record, or '
                                  f'fix these keys')
            if differ:
                notes.append(f'the record in {path} and {opt_name} differ on {describe_differences(differ)}: the '
                             f'option file\'s values are used')
        device = resolve_device(device)
        net = build_network(opt)
        load_network_weights(net, path, param_key, trusted=trust_checkpoint, loaded=loaded)  # SRDiff: encoder too
        if overrides.get('tiling') is None:  # the default every front end shares
            overrides['tiling'] = default_tiling(opt)
        resolver = cls.from_network(net, opt, device, attention_source, **overrides)
        resolver.record, resolver.notes, resolver.checkpoint = record, notes + resolver.notes, path
        return resolver

    def describe(self) -> str:
        """The settings on one line: sampler and steps, YODA, tiles, sparse sampling, colour fix."""
        pipe = self.pipeline
        tiling = pipe.tiling
        tiles = (f'tiles of {tiling.tile_size} px (overlap {tiling.tile_overlap})' if tiling.enabled
                 else 'tiles off (whole image)')
        source = getattr(self.attention_source, 'name', None) or type(self.attention_source).__name__
        yoda = (f'YODA on (lower bound {pipe.yoda.lower_bound}, attention {source})' if pipe.yoda.enabled
                else 'YODA off')
        sparse = f', sparse {pipe.sparse.mode}:{pipe.sparse.margin}' if pipe.sparse.enabled else ''
        return (f'sampler {pipe.sampler_config.type}, {pipe.steps} steps, {yoda}, {tiles}{sparse}, colour fix '
                f'{pipe.colour_fix or "off"}')

    # -- inference ---------------------------------------------------------------------------------
    def _upsample(self, lq: torch.Tensor, lr: Optional[np.ndarray]) -> torch.Tensor:
        H, W = lq.shape[-2] * self.scale, lq.shape[-1] * self.scale
        if lr is not None:  # uint8: the datasets' own bicubic, then to [0, 1]
            from .data.transforms import bicubic_resize
            up = bicubic_resize(lr, (H, W), self.resize)
            return torch.from_numpy(up.transpose(2, 0, 1).copy()).float()[None].div(255.0).to(self.device)
        return torch.nn.functional.interpolate(lq, size=(H, W), mode='bicubic', align_corners=False).clamp(0, 1)

    def _attention(self, attention, lr_image: np.ndarray, hr_size) -> Optional[torch.Tensor]:
        from .data.transforms import resize_attention
        if not self.pipeline.yoda.enabled:
            return None
        if attention is None:
            if self.attention_source is None:
                raise ValueError('YODA is on but no attention map was given and no attention source is configured '
                                 '(pass attention=..., or attention_source=..., or use an option file whose dataset '
                                 'records attention_meta.source)')
            attention = self.attention_source(lr_image)
        amap = attention.detach().cpu().numpy() if isinstance(attention, torch.Tensor) else np.asarray(attention)
        given = tuple(amap.shape)
        # Only batch / channel axes of size 1 go: a 1-pixel side (a 1x5 LR image) is a real axis.
        if amap.ndim == 4 and amap.shape[:2] == (1, 1):
            amap = amap[0, 0]
        elif amap.ndim == 3 and amap.shape[0] == 1:
            amap = amap[0]
        elif amap.ndim == 3 and amap.shape[2] == 1:
            amap = amap[:, :, 0]
        if amap.ndim != 2:
            raise ValueError(f'attention map must be 2-D (h, w), or (1, h, w) / (1, 1, h, w), got shape {given}')
        amap = amap.astype(np.float32)
        # Checked on the grid it was given on: the bilinear resize below would clip values outside [0, 1].
        check_attention(torch.from_numpy(amap), 'attention map')
        if tuple(amap.shape) != tuple(hr_size):
            lr_size = (hr_size[0] // self.scale, hr_size[1] // self.scale)
            if tuple(amap.shape) != lr_size:
                raise ValueError(f'attention map {amap.shape} matches neither the LR size {lr_size} nor the HR size '
                                 f'{tuple(hr_size)}')
            amap = resize_attention(amap, hr_size)
        return torch.from_numpy(np.ascontiguousarray(amap))[None, None].to(self.device)

    @torch.no_grad()
    def super_resolve_one(self, lr: Union[np.ndarray, torch.Tensor], attention=None, seed: Optional[int] = 0,
                          callback=None, progress: bool = False) -> torch.Tensor:
        """One image: uint8 RGB (h, w, 3) or a float tensor (3, h, w) / (1, 3, h, w) in [0, 1]; (1, 3, H, W) out."""
        from .attention import as_rgb_uint8
        if isinstance(lr, torch.Tensor):
            lq = (lr[None] if lr.dim() == 3 else lr).float().to(self.device)
            if lq.dim() != 4 or lq.shape[:2] != (1, 3):
                raise ValueError(f'an LR tensor must be (3, h, w) or (1, 3, h, w), got {tuple(lr.shape)}')
            check_tensor_range(lr, lq)
            lr_image, uint8 = lq[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), None
        else:
            uint8 = lr_image = as_rgb_uint8(lr)
            lq = torch.from_numpy(uint8.transpose(2, 0, 1).copy()).float()[None].div(255.0).to(self.device)
        lq_up = self._upsample(lq, uint8)
        att = self._attention(attention, lr_image, lq_up.shape[-2:])
        return self.sample_prepared(lq, lq_up, att, seed, callback, progress)

    @torch.no_grad()
    def sample_prepared(self, lq: torch.Tensor, lq_up: torch.Tensor, attention: Optional[torch.Tensor] = None,
                        seed: Optional[int] = 0, callback=None, progress: bool = False) -> torch.Tensor:
        """A batch as a dataset gives it: ``lq``, ``lq_up`` (B, 3, ., .) in [0, 1] and the HR-grid ``attention``
        (B, 1, H, W); SR (B, 3, H, W) in [0, 1]. ``last_info``: ``update_share`` (YODA's share of full
        diffusion's pixel updates; ``update_ratio`` is the same), ``tiles``, ``steps``, ``sampler_name``,
        ``sparse_stats`` and ``sparse_note`` (why sparse sampling ran dense, else None), ``attention``,
        ``colour_fix``, ``seconds``."""
        lq, lq_up = lq.to(self.device), lq_up.to(self.device)
        attention = None if attention is None or not self.pipeline.yoda.enabled else attention.to(self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        start = time.perf_counter()
        out, info = self.pipeline(lq, lq_up, attention, generator, callback, progress)
        share = float(self.pipeline.update_ratio(attention).mean()) if attention is not None else 1.0
        info.update(attention=attention, update_share=share, update_ratio=share,  # update_ratio: the older name
                    steps=self.pipeline.steps, sampler_name=self.pipeline.sampler_config.type,
                    sparse_note=sparse_note(self.pipeline, info.get('sparse_stats')),
                    seconds=time.perf_counter() - start)
        self.last_info = info
        return out

    def __call__(self, lr_images: ImageLike, attention=None, seed: Optional[int] = 0, progress: bool = False):
        """SR images: numpy uint8 RGB in -> numpy uint8 RGB out (a list for a list), tensor in -> tensor out.

        ``attention``: one map (or a list, one per image) on the LR or HR grid; None computes it. Image i of
        a batch uses ``seed + i``.
        """
        single = isinstance(lr_images, np.ndarray) or (isinstance(lr_images, torch.Tensor) and lr_images.dim() == 3)
        images = [lr_images] if single else list(lr_images)
        maps = attention if isinstance(attention, (list, tuple)) else [attention] * len(images)
        if len(maps) != len(images):
            raise ValueError(f'{len(maps)} attention maps for {len(images)} images')
        outs = [self.super_resolve_one(img, a, None if seed is None else seed + i, progress=progress)
                for i, (img, a) in enumerate(zip(images, maps))]
        if isinstance(lr_images, torch.Tensor):
            return outs[0][0] if single else torch.cat(outs)
        as_uint8 = [np.clip(np.round(o[0].permute(1, 2, 0).cpu().numpy() * 255.0), 0, 255).astype(np.uint8)
                    for o in outs]
        return as_uint8[0] if single else as_uint8


SPARSE_WITHOUT_YODA = ('sparse sampling is on but YODA is off: there is no mask to crop to, so the network runs '
                       'densely on every pixel')


def sparse_note(pipeline, stats: Optional[dict]) -> Optional[str]:
    """Why sparse sampling ran dense (the network on every pixel at every step), or None when it did not."""
    sparse = pipeline.sparse
    if not sparse.enabled:
        return None
    if stats is None:
        return SPARSE_WITHOUT_YODA
    if stats['calls'] and not stats['cropped_calls']:
        cost = f' plus the region cost {sparse.region_cost:g}' if sparse.mode == 'regions' else ''
        return (f'sparse sampling fell back to dense at all {stats["calls"]} network calls: the active region (the '
                f'mask grown by the {sparse.margin}-pixel margin{cost}) covered more than max_fraction '
                f'{sparse.max_fraction:g} of the image at every step; the network ran on every pixel (a smaller '
                f'margin, or a larger image, leaves room to crop)')
    return None


# Resampling overshoot a hair outside [0, 1] is clamped; anything further is another value range (0..255).
_TENSOR_TOLERANCE = 1e-3


def check_tensor_range(given: torch.Tensor, lq: torch.Tensor):
    """Refuse an LR tensor that is not an image in [0, 1] (a 0..255 tensor would be clamped to white)."""
    if not lq.numel():
        raise ValueError(f'the LR tensor is empty: shape {tuple(given.shape)}')
    if bool(((lq >= -_TENSOR_TOLERANCE) & (lq <= 1 + _TENSOR_TOLERANCE)).all()):
        return
    if not bool(torch.isfinite(lq).all()):
        raise ValueError('the LR tensor contains NaN or Inf values; expected finite values in [0, 1]')
    lo, hi = float(lq.min()), float(lq.max())
    raise ValueError(f'an LR tensor must hold values in [0, 1], got {given.dtype} with min {lo:.4g} and max '
                     f'{hi:.4g}; divide a 0..255 image by 255 (or pass it as a uint8 numpy array)')


def dataset_resize(opt: dict) -> str:
    return next((ds.get('resize', 'pil') for ds in (opt.get('datasets') or {}).values() if ds), 'pil')


def attention_source_for(opt: dict, device=None, name: Optional[str] = None, params: Optional[dict] = None):
    """The attention source ``name`` (with ``params``), or the one recorded in the option file's dataset
    ``attention_meta`` (its parameters updated by ``params``); None if neither names one."""
    from .attention import ATTENTION_SOURCES, _init_parameters, build_attention_source
    config = {'name': name, **(params or {})} if name else None
    for ds in (opt.get('datasets') or {}).values():
        src = ((ds or {}).get('attention_meta') or {}).get('source')
        if config is None and src:
            config = {**dict(src), **(params or {})}
    if config is None:
        if params:
            raise ValueError('attention source parameters given but no source: name one (e.g. --source edge)')
        return None
    name = config.pop('name')
    if name not in ATTENTION_SOURCES:
        raise ValueError(f'unknown attention source {name!r}; known: {", ".join(sorted(ATTENTION_SOURCES))}')
    if 'device' in {p.name for p in _init_parameters(ATTENTION_SOURCES[name])} and 'device' not in config:
        config['device'] = str(resolve_device(device))
    return build_attention_source(name, **config)


__all__ = ['DEFAULT_PARAM_KEY', 'DEFAULT_SEED', 'YODAResolver', 'attention_source_for', 'dataset_resize',
           'default_tiling', 'resolve_device', 'sampler_setting', 'sparse_note', 'tiling_setting']
