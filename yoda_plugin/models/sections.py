"""The option sections the diffusion models read, declared as dataclasses with one validation path.

Each section is built by :func:`yoda_plugin.core.options.build_section`:
unknown keys fail naming the closest known one, values are checked in
``__post_init__`` with errors that name ``<section>.<key>``.

* ``diffusion``: :class:`DiffusionConfig` (the training schedule, T_eval, DDPM variance, clipping).
* ``val``: :class:`ValOptions`, with the sections ``val.sampler``
  (:class:`~yoda_plugin.core.samplers.SamplerConfig`), ``val.sparse``
  (:class:`~yoda_plugin.core.sparse.SparseConfig`), the tile keys
  (:class:`~yoda_plugin.core.tiling.TilingConfig`) and the fast paths.
* ``train.amp`` / ``train.channels_last`` / ``train.compile``: :class:`FastPaths`.
* ``srdiff``: :class:`SRDiffConfig`.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import torch

from yoda_plugin.core.colour_fix import check_colour_fix
from yoda_plugin.core.options import build_section
from yoda_plugin.core.samplers import VARIANCE_TYPES, SamplerConfig
from yoda_plugin.core.schedule import SCHEDULES, DiffusionSchedule, make_beta_schedule
from yoda_plugin.core.sparse import SparseConfig
from yoda_plugin.core.tiling import TilingConfig

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
NAN_POLICIES = ('raise', 'skip')
DEFAULT_NAN_SKIP_LIMIT = 10  # consecutive skipped steps (train.nan_skip_limit) before a skipping run stops


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bool(value, name: str):
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be true or false, got {value!r}')


@dataclass
class DiffusionConfig:
    """The ``diffusion`` section. Defaults: SR3's 2000-step linear schedule (1e-6 .. 1e-2) compressed to
    500 steps (the same end point, abar_T = exp(-10)), sampled on 200 (the paper's T_train and T_eval).
    ``sample_steps`` null: all T steps (SRDiff's default)."""
    schedule: str = 'linear'
    num_timesteps: int = 500
    linear_start: float = 4e-6
    linear_end: float = 4e-2
    cosine_s: float = 8e-3
    sample_steps: Optional[int] = 200
    variance: str = 'posterior'
    clip_denoised: bool = True
    continuous_noise_level: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f'diffusion.schedule must be one of {SCHEDULES}, got {self.schedule!r}')
        if not _is_int(self.num_timesteps) or self.num_timesteps < 1:
            raise ValueError(f'diffusion.num_timesteps must be a positive integer, got {self.num_timesteps!r}')
        for name in ('linear_start', 'linear_end', 'cosine_s'):
            if not _is_number(getattr(self, name)):
                raise ValueError(f'diffusion.{name} must be a number, got {getattr(self, name)!r}')
        if self.sample_steps is None:
            self.sample_steps = self.num_timesteps
        if not _is_int(self.sample_steps) or not 1 <= self.sample_steps <= self.num_timesteps:
            raise ValueError(f'diffusion.sample_steps (T_eval) must be an integer in [1, num_timesteps='
                             f'{self.num_timesteps}], got {self.sample_steps!r}')
        if self.variance not in VARIANCE_TYPES:
            raise ValueError(f'diffusion.variance must be one of {VARIANCE_TYPES}, got {self.variance!r}')
        _check_bool(self.clip_denoised, 'diffusion.clip_denoised')
        _check_bool(self.continuous_noise_level, 'diffusion.continuous_noise_level')

    @classmethod
    def from_options(cls, opt: Optional[dict], defaults: Optional[dict] = None,
                     where: str = 'diffusion') -> 'DiffusionConfig':
        """The section ``opt`` over ``defaults`` (a backbone's own, e.g. SRDiff's cosine schedule)."""
        if opt is not None and not isinstance(opt, dict):
            raise ValueError(f'{where} must be a mapping of options, got {type(opt).__name__} {opt!r}')
        return build_section(cls, {**(defaults or {}), **(opt or {})}, where)

    def training_schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(make_beta_schedule(self.schedule, self.num_timesteps, self.linear_start,
                                                    self.linear_end, self.cosine_s))

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
        _check_bool(self.channels_last, f'{self.phase}.channels_last')
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
        if self.sample_seed is not None and not _is_int(self.sample_seed):
            raise ValueError(f'val.sample_seed must be an integer or null (the global RNG), got {self.sample_seed!r}')
        if not _is_int(self.tb_images) or self.tb_images < 0:
            raise ValueError(f'val.tb_images must be an integer >= 0, got {self.tb_images!r}')
        self.sampler_config = SamplerConfig.from_options(self.sampler, 'val.sampler')
        self.sparse_config = build_section(SparseConfig, self.sparse, 'val.sparse')
        self.tiling = TilingConfig(self.tile_size, self.tile_overlap or 0, self.tile_margin)
        self.fast = FastPaths(self.amp, self.channels_last, self.compile, phase='val')

    @classmethod
    def from_options(cls, opt: Optional[dict]) -> 'ValOptions':
        return build_section(cls, opt, 'val')


VAL_KEYS = {f.name for f in fields(ValOptions)}


@dataclass
class SRDiffConfig:
    """The ``srdiff`` section: SRDiff's residual scaling (``res_rescale``) and input clipping (``clip_input``)."""
    res_rescale: float = 2.0
    clip_input: bool = True

    def __post_init__(self):
        r = self.res_rescale
        if not _is_number(r) or not r > 0:
            raise ValueError(f'srdiff.res_rescale must be a positive number, got {r!r}')
        _check_bool(self.clip_input, 'srdiff.clip_input')

    @classmethod
    def from_options(cls, opt: Optional[dict]) -> 'SRDiffConfig':
        return build_section(cls, opt, 'srdiff')

    def as_dict(self) -> dict:
        return asdict(self)
