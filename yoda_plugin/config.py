"""Option sections and the pipeline builder: from an option dict to a :class:`~yoda_plugin.core.pipeline.DiffusionSR`.

BasicSR-free (it imports only :mod:`yoda_plugin.core`): the BasicSR models
(:mod:`yoda_plugin.models`) and the inference object
(:class:`yoda_plugin.YODAResolver`) both read their options through it, so
inference needs no training class.

Each section is a dataclass built by :func:`yoda_plugin.core.options.build_section`:
unknown keys fail naming the closest known one, values are checked in
``__post_init__`` with errors that name ``<section>.<key>``.

* ``diffusion``: :class:`DiffusionConfig` (the training schedule, T_eval, DDPM variance, clipping), over the
  backbone's ``diffusion_defaults``.
* ``yoda``: :class:`~yoda_plugin.core.yoda.YODAConfig`.
* ``val``: :class:`ValOptions`, with the sections ``val.sampler``
  (:class:`~yoda_plugin.core.samplers.SamplerConfig`), ``val.sparse``
  (:class:`~yoda_plugin.core.sparse.SparseConfig`), the tile keys
  (:class:`~yoda_plugin.core.tiling.TilingConfig`) and the fast paths.
* ``train.amp`` / ``train.channels_last`` / ``train.compile``: :class:`FastPaths`.
* the backbone's own section (``srdiff``: :class:`~yoda_plugin.core.adapters.SRDiffConfig`).

:func:`option_sections` builds them all for a backbone; :func:`pipeline_from_sections` turns parsed sections
into the pipeline; :func:`build_pipeline` does both for a network and an option dict, with overrides given as
``val`` keys would be. The backbone of an option dict is the one its ``model_type`` trains
(:func:`backbone_of`).
"""
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Optional, Union

import torch

from yoda_plugin.core.adapters import SRDiffConfig, backbone_for_model_type, get_backbone  # noqa: F401  (a section)
from yoda_plugin.core.colour_fix import check_colour_fix
from yoda_plugin.core.options import build_section, check_bool, is_int, is_number
from yoda_plugin.core.pipeline import DiffusionSR
from yoda_plugin.core.samplers import VARIANCE_TYPES, SamplerConfig
from yoda_plugin.core.schedule import PREDICTIONS, SCHEDULES, DiffusionSchedule, make_beta_schedule
from yoda_plugin.core.sparse import SparseConfig
from yoda_plugin.core.tiling import TilingConfig
from yoda_plugin.core.yoda import YODAConfig

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
NAN_POLICIES = ('raise', 'skip')
DEFAULT_NAN_SKIP_LIMIT = 10  # consecutive skipped steps (train.nan_skip_limit) before a skipping run stops


@dataclass
class DiffusionConfig:
    """The ``diffusion`` section. Defaults: SR3's 2000-step linear schedule (1e-6 .. 1e-2) compressed to
    500 steps (the same end point, abar_T = exp(-10)), sampled on 200 (the paper's T_train and T_eval).
    ``sample_steps`` null: all T steps (SRDiff's default). ``prediction``: what the network predicts, the noise
    eps (the paper) or the velocity v (Salimans & Ho 2022; faster to train, see docs/convergence.md)."""
    schedule: str = 'linear'
    num_timesteps: int = 500
    linear_start: float = 4e-6
    linear_end: float = 4e-2
    cosine_s: float = 8e-3
    sample_steps: Optional[int] = 200
    variance: str = 'posterior'
    clip_denoised: bool = True
    continuous_noise_level: bool = True
    prediction: str = 'eps'

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f'diffusion.schedule must be one of {SCHEDULES}, got {self.schedule!r}')
        if not is_int(self.num_timesteps) or self.num_timesteps < 1:
            raise ValueError(f'diffusion.num_timesteps must be a positive integer, got {self.num_timesteps!r}')
        for name in ('linear_start', 'linear_end', 'cosine_s'):
            if not is_number(getattr(self, name)):
                raise ValueError(f'diffusion.{name} must be a number, got {getattr(self, name)!r}')
        if self.sample_steps is None:
            self.sample_steps = self.num_timesteps
        if not is_int(self.sample_steps) or not 1 <= self.sample_steps <= self.num_timesteps:
            raise ValueError(f'diffusion.sample_steps (T_eval) must be an integer in [1, num_timesteps='
                             f'{self.num_timesteps}], got {self.sample_steps!r}')
        if self.variance not in VARIANCE_TYPES:
            raise ValueError(f'diffusion.variance must be one of {VARIANCE_TYPES}, got {self.variance!r}')
        check_bool(self.clip_denoised, 'diffusion.clip_denoised')
        check_bool(self.continuous_noise_level, 'diffusion.continuous_noise_level')
        if self.prediction not in PREDICTIONS:
            raise ValueError(f'diffusion.prediction must be one of {PREDICTIONS} (the noise, as the paper, or the '
                             f'velocity v), got {self.prediction!r}')

    @classmethod
    def from_options(cls, opt: Optional[dict], defaults: Optional[dict] = None,
                     where: str = 'diffusion') -> 'DiffusionConfig':
        """The section ``opt`` over ``defaults`` (a backbone's own, e.g. SRDiff's cosine schedule)."""
        if opt is not None and not isinstance(opt, dict):
            raise ValueError(f'{where} must be a mapping of options, got {type(opt).__name__} {opt!r}')
        return build_section(cls, {**(defaults or {}), **(opt or {})}, where)

    def training_schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(make_beta_schedule(self.schedule, self.num_timesteps, self.linear_start,
                                                    self.linear_end, self.cosine_s), prediction=self.prediction)

    def as_dict(self) -> dict:
        return asdict(self)


DIFFUSION_DEFAULTS = DiffusionConfig().as_dict()  # SR3Model's defaults, as a plain dict


def diffusion_options(opt: Optional[dict], where: str = 'diffusion') -> dict:
    """The ``diffusion`` section with SR3Model's defaults filled in, checked, as a dict."""
    return DiffusionConfig.from_options(opt, where=where).as_dict()


@dataclass
class FastPaths:
    """``<phase>.amp`` (null: float32, ``bf16``, ``fp16``), ``<phase>.channels_last``, ``<phase>.compile``
    (true or a dict of ``torch.compile`` keyword arguments) for ``phase`` train or val."""
    amp: Optional[str] = None
    channels_last: bool = False
    compile: Union[bool, dict, None] = False
    phase: str = 'val'

    KEYS = ('amp', 'channels_last', 'compile')

    def __post_init__(self):
        if self.amp in (False, 'none'):
            self.amp = None
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f'{self.phase}.amp must be null, bf16 or fp16, got {self.amp!r}')
        if self.channels_last is None:
            self.channels_last = False
        check_bool(self.channels_last, f'{self.phase}.channels_last')
        if self.compile is None:
            self.compile = False
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f'{self.phase}.compile must be true, false or a dict of torch.compile arguments, '
                             f'got {self.compile!r}')

    @classmethod
    def from_section(cls, section: Optional[dict], phase: str) -> 'FastPaths':
        section = section or {}
        return cls(**{k: section[k] for k in cls.KEYS if k in section}, phase=phase)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES.get(self.amp)

    @property
    def compile_kwargs(self) -> Optional[dict]:
        """None: no compilation; else the keyword arguments of ``torch.compile``."""
        if not self.compile:
            return None
        return dict(self.compile) if isinstance(self.compile, dict) else {}


@dataclass
class ValOptions:
    """The ``val`` section (BasicSR's keys and ours). ``sampler`` / ``sparse`` are sections of their own;
    ``tile_size`` / ``tile_overlap`` / ``tile_margin`` make ``tiling``; amp / channels_last / compile ``fast``.
    ``colour_fix``: null (default), ``wavelet`` or ``adain``, applied to every sampled image against the
    upsampled LR (:mod:`yoda_plugin.core.colour_fix`)."""
    val_freq: Union[int, float, None] = None
    save_img: bool = False
    suffix: Optional[str] = None
    pbar: bool = False
    metrics: Optional[dict] = None
    sample_seed: Optional[int] = 0
    progress: bool = False
    tb_images: int = 2
    save_attention: bool = False
    sampler: Optional[dict] = None
    sparse: Optional[dict] = None
    tile_size: Optional[int] = None
    tile_overlap: Optional[int] = 0
    tile_margin: Optional[int] = None
    amp: Optional[str] = None
    channels_last: bool = False
    compile: Union[bool, dict, None] = False
    colour_fix: Optional[str] = None

    def __post_init__(self):
        self.colour_fix = check_colour_fix(self.colour_fix, 'val.colour_fix')
        # Built from the keys (attributes, not fields: not option keys): sampler_config, sparse_config, tiling, fast.
        if self.sample_seed is not None and not is_int(self.sample_seed):
            raise ValueError(f'val.sample_seed must be an integer or null (the global RNG), got {self.sample_seed!r}')
        if not is_int(self.tb_images) or self.tb_images < 0:
            raise ValueError(f'val.tb_images must be an integer >= 0, got {self.tb_images!r}')
        self.sampler_config = SamplerConfig.from_options(self.sampler, 'val.sampler')
        self.sparse_config = build_section(SparseConfig, self.sparse, 'val.sparse')
        self.tiling = TilingConfig(self.tile_size, self.tile_overlap or 0, self.tile_margin)
        self.fast = FastPaths(self.amp, self.channels_last, self.compile, phase='val')

    @classmethod
    def from_options(cls, opt: Optional[dict]) -> 'ValOptions':
        return build_section(cls, opt, 'val')


VAL_KEYS = {f.name for f in fields(ValOptions)}


def backbone_of(opt: dict):
    """The backbone adapter class of an option dict: the one its ``model_type`` trains."""
    return backbone_for_model_type(opt.get('model_type'))


def option_sections(backbone, opt: dict) -> dict:
    """Every option section a model of ``backbone`` reads, built once (errors name ``<section>.<key>``).

    Keys: ``diffusion``, ``yoda``, ``val_opt``, ``train_fast``, ``backbone_opts`` (the adapter's keyword
    arguments) and the backbone's own section under its name (``srdiff``), when it has one.
    """
    backbone = get_backbone(backbone)
    sections = {'diffusion': DiffusionConfig.from_options(opt.get('diffusion'), backbone.diffusion_defaults),
                'yoda': YODAConfig.from_options(opt.get('yoda')),
                'val_opt': ValOptions.from_options(opt.get('val')),
                'train_fast': FastPaths.from_section(opt.get('train'), 'train')}
    section, adapter_options = backbone.parse_options(opt)
    if backbone.section is not None:
        sections[backbone.section] = section
    sections['backbone_opts'] = adapter_options
    return sections


def apply_fast_paths(net, fast, compile_method: str = 'forward'):
    """``channels_last`` and ``compile`` of a :class:`~.sections.FastPaths` on ``net`` (once each).

    channels_last stores conv weights NHWC (the adapters feed inputs so), which tensor cores prefer under mixed
    precision; ``compile`` wraps the method ``compile_method`` with ``torch.compile``, so state dicts keep
    their keys. Returns ``net``.
    """
    if fast.channels_last and not getattr(net, '_yoda_channels_last', False):
        net.to(memory_format=torch.channels_last)
        net._yoda_channels_last = True
    if fast.compile_kwargs is not None and not getattr(net, '_yoda_compiled', False):
        setattr(net, compile_method, torch.compile(getattr(net, compile_method), **fast.compile_kwargs))
        net._yoda_compiled = True
    return net


def pipeline_from_sections(net, backbone: str, scale: int, diffusion, yoda, val, backbone_options: dict,
                           schedule=None, **overrides) -> DiffusionSR:
    """The ``DiffusionSR`` of parsed sections (:class:`~.sections.DiffusionConfig`, ``YODAConfig``,
    :class:`~.sections.ValOptions`); ``overrides``: keyword arguments of ``DiffusionSR``."""
    kwargs = dict(sampler=val.sampler_config, default_steps=diffusion.sample_steps, variance=diffusion.variance,
                  clip=diffusion.clip_denoised, sparse=val.sparse_config, tiling=val.tiling,
                  amp_dtype=val.fast.amp_dtype, channels_last=getattr(net, '_yoda_channels_last', False),
                  backbone_options=backbone_options, colour_fix=val.colour_fix)
    kwargs.update(overrides)
    return DiffusionSR(net, backbone, schedule or diffusion.training_schedule(), scale, yoda, **kwargs)


def _plain(value):
    return asdict(value) if is_dataclass(value) else dict(value)


def _rounded_tiling(tiling: dict, multiple: int) -> dict:
    """``tile_size`` rounded down to the network's size multiple, ``tile_overlap`` (default: a quarter tile) too."""
    size, overlap = tiling.get('tile_size'), tiling.get('tile_overlap')
    if size is None:
        return tiling
    # Refused before rounding: rounding would turn a negative size into the smallest tile and blame the overlap.
    if not is_int(size) or size < 1:
        raise ValueError(f'tile_size must be a positive integer of HR pixels (null: no tiling), got {size!r}')
    if overlap is not None and (not is_int(overlap) or overlap < 0):
        raise ValueError(f'tile_overlap must be an integer >= 0 of HR pixels, got {overlap!r}')
    rounded = max(multiple, size // multiple * multiple)
    if rounded == multiple:
        raise ValueError(f'tile_size {size} is too small: tiles overlap by at least the network\'s size multiple '
                         f'{multiple}, so they need at least {2 * multiple} HR pixels')
    overlap = rounded // 4 if overlap is None else overlap
    return {**tiling, 'tile_size': rounded, 'tile_overlap': max(multiple, overlap // multiple * multiple)}


def build_pipeline(net, opt: dict, sampler=None, sparse=None, tiling=None, amp: Optional[str] = None,
                   channels_last: Optional[bool] = None, sample_steps: Optional[int] = None,
                   colour_fix: Optional[str] = None) -> DiffusionSR:
    """The model's pipeline for ``net`` (weights loaded) and the options ``opt``, nothing written into ``opt``.

    Overrides, each as in the ``val`` section: ``sampler`` (``val.sampler``), ``sparse`` (``val.sparse``),
    ``tiling`` (``tile_size`` / ``tile_overlap`` / ``tile_margin``; with ``round: true`` the size and overlap
    are rounded down to the network's multiple, the overlap defaulting to a quarter tile), ``amp``,
    ``channels_last`` (applied to ``net``), ``colour_fix`` (``val.colour_fix``: ``wavelet``, ``adain``, or ``none``
    to switch off the options' fix); ``sample_steps`` replaces ``diffusion.sample_steps``.
    Dataclass sections (``SamplerConfig``, ...) are accepted too.
    """
    backbone = backbone_of(opt)
    val = dict(opt.get('val') or {})
    diffusion = dict(opt.get('diffusion') or {})
    for key, value in (('sampler', sampler), ('sparse', sparse)):
        if value is not None:
            val[key] = _plain(value)
    tiling = None if tiling is None else _plain(tiling)
    rounding = bool(tiling.pop('round', False)) if tiling else False
    if tiling is not None:
        val.update(tiling)
    if amp is not None:
        val['amp'] = amp
    if channels_last is not None:
        val['channels_last'] = channels_last
    if colour_fix is not None:
        val['colour_fix'] = colour_fix
    if sample_steps is not None:
        diffusion['sample_steps'] = sample_steps
    if rounding and val.get('tile_size') is not None:  # the multiple is the network's, as the untiled pipeline's
        val.update(_rounded_tiling(tiling, backbone.size_multiple(net, opt['scale'])))
    sections = option_sections(backbone, {**opt, 'val': val, 'diffusion': diffusion})
    apply_fast_paths(net, sections['val_opt'].fast, backbone.compile_method)
    return pipeline_from_sections(net, backbone, opt['scale'], sections['diffusion'], sections['yoda'],
                                  sections['val_opt'], sections['backbone_opts'])
