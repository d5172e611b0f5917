"""From option sections to the one sampling pipeline: shared by the BasicSR models and ``YODAResolver``.

:func:`pipeline_from_sections` builds the :class:`~yoda_plugin.core.pipeline.DiffusionSR`
of parsed sections (what :class:`~.base_model.DiffusionSRModel` does at set-up);
:func:`build_pipeline` does the same for a network and an option dict, with
the sections parsed by the option file's model class (its defaults, e.g.
SRDiff's schedule, and its checks) and overrides given as ``val`` keys would be.
"""
import copy
from dataclasses import asdict, is_dataclass
from typing import Optional

import torch

from yoda_plugin.core.pipeline import DiffusionSR

from .checkpoint import load_network_weights  # noqa: F401  (re-exported for the inference API)


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


def model_class(opt: dict):
    """The registered diffusion model class of ``opt['model_type']`` (SR3Model, SRDiffModel)."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from .base_model import DiffusionSRModel
    name = opt.get('model_type')
    try:
        cls = MODEL_REGISTRY.get(name)
    except KeyError:
        cls = None
    if cls is None or not issubclass(cls, DiffusionSRModel):
        raise ValueError(f'model_type: {name!r} is no diffusion SR model (SR3Model or SRDiffModel)')
    return cls


def build_network(opt: dict):
    """``network_g`` of the options, built by BasicSR's registry (float32, CPU)."""
    from basicsr.archs import build_network as _build
    if not opt.get('network_g'):
        raise ValueError('the options have no network_g section')
    return _build(copy.deepcopy(dict(opt['network_g'])))


def _plain(value):
    return asdict(value) if is_dataclass(value) else dict(value)


def _rounded_tiling(tiling: dict, multiple: int) -> dict:
    """``tile_size`` rounded down to the network's size multiple, ``tile_overlap`` (default: a quarter tile) too."""
    size = tiling.get('tile_size')
    if size is None:
        return tiling
    size = max(multiple, int(size) // multiple * multiple)
    overlap = tiling.get('tile_overlap')
    overlap = size // 4 if overlap is None else int(overlap)
    overlap = max(multiple, overlap // multiple * multiple) if size > multiple else 0
    return {**tiling, 'tile_size': size, 'tile_overlap': overlap}


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
    cls = model_class(opt)
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
    build = lambda s: pipeline_from_sections(  # noqa: E731
        net, cls.backbone, opt['scale'], s['diffusion'], s['yoda'], s['val_opt'], s['backbone_opts'])
    if rounding and val.get('tile_size') is not None:  # the multiple is the untiled pipeline's
        multiple = build(cls.option_sections({**opt, 'val': {**val, 'tile_size': None}, 'diffusion': diffusion}))
        val.update(_rounded_tiling(tiling, multiple.multiple))
    sections = cls.option_sections({**opt, 'val': val, 'diffusion': diffusion})
    apply_fast_paths(net, sections['val_opt'].fast, cls.compile_method)
    return build(sections)
