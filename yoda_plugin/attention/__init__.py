"""Attention sources: an LR image in, an attention map in [0, 1] out.

YODA (paper Sec. 3.1, Eq. 9) decides per pixel how many diffusion steps it is
refined for from an attention map ``A`` in [0, 1]. Every way of producing ``A``
(the deterministic baselines of Sec. 4.2.1 in :mod:`.deterministic`, DINO heads
later) implements :class:`AttentionSource`:

* ``source(image)``: ``image`` is RGB, ``(H, W, 3)``; ``uint8`` (or ``uint16``)
  or float in [0, 1]. Grayscale ``(H, W)`` / ``(H, W, 1)`` is accepted and RGBA
  ``(H, W, 4)`` drops its alpha channel; any other shape raises ``ValueError``
  naming the shape. The result is ``float32`` ``(H, W)`` in [0, 1] at the
  image's own size.
* ``source.config()``: the source name and every constructor parameter, as
  plain JSON types. It is recorded in the metadata of precomputed attention
  LMDBs so a dataset can refuse maps made with another configuration.
* ``source.batch(images)``: a list of maps; loops by default (GPU sources
  override it).

Sources are registered by name in :data:`ATTENTION_SOURCES` with
:func:`register_attention_source` and built with :func:`build_attention_source`;
:func:`parse_source_opts` reads the command lines' ``--source-opt key=value``.
"""
import inspect
import re
from typing import Dict, List, Type

import numpy as np
import yaml

from yoda_plugin.utils.jsonable import to_json

__all__ = [
    'ATTENTION_SOURCES', 'AttentionSource', 'as_rgb_float32', 'as_rgb_uint8', 'build_attention_source',
    'build_attention_source_from_config', 'parse_source_opts', 'register_attention_source', 'EdgeAttention',
    'GaussianAttention', 'SiftAttention', 'normalize_map'
]

ATTENTION_SOURCES: Dict[str, Type['AttentionSource']] = {}

_SHAPES_ACCEPTED = '(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)'
# Floats a hair outside [0, 1] (resampling overshoot) are clipped; anything
# further out is almost always a 0..255 image passed as float, so it raises.
_FLOAT_TOLERANCE = 1e-3


def _checked_rgb(image) -> np.ndarray:
    """Shape, dtype and range checks shared by :func:`as_rgb_uint8` and :func:`as_rgb_float32`.

    Returns an ``(H, W, 3)`` array of the input dtype (grey replicated, alpha dropped).
    """
    arr = np.asarray(image)
    shape = tuple(arr.shape)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f'expected an image of shape {_SHAPES_ACCEPTED}, got shape {shape}')
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f'expected a non-empty image, got shape {shape}')
    if np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f'image of shape {shape} contains NaN or Inf values')
        lo, hi = float(values.min()), float(values.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
            raise ValueError(f'float images must have values in [0, 1], got min {lo:.4g} and max {hi:.4g} '
                             f'(shape {shape}); pass uint8 for 0..255 data')
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f'expected a uint8, uint16 or float image, got dtype {arr.dtype} (shape {shape})')
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return arr


def as_rgb_uint8(image) -> np.ndarray:
    """Validate an image and return it as contiguous RGB ``uint8`` ``(H, W, 3)``.

    Accepted shapes: ``(H, W)`` and ``(H, W, 1)`` (grayscale, replicated to three
    channels), ``(H, W, 3)`` (RGB) and ``(H, W, 4)`` (RGBA; alpha dropped), with
    ``H, W >= 1``. Accepted dtypes: ``uint8``; ``uint16`` (scaled by 255/65535);
    floating point with finite values in [0, 1] (values up to 1e-3 outside are
    clipped; scaled by 255 and rounded). Anything else raises ``ValueError``
    naming the shape or dtype.
    """
    arr = _checked_rgb(image)
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    else:
        out = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(out)


def as_rgb_float32(image) -> np.ndarray:
    """As :func:`as_rgb_uint8`, but float32 in [0, 1]; float input keeps its precision."""
    arr = _checked_rgb(image)
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    else:
        out = np.clip(arr.astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(out)


def normalize_map(raw: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-image min-max normalisation of a non-negative raw map to [0, 1].

    ``(raw - min) / (max - min)``, returned as ``float32``. A raw map without
    contrast (``max - min <= eps``) is returned as all zeros when it is zero
    everywhere (no structure found: constant image, no edges, no keypoints)
    and as all ones when it is positive everywhere (structure covers the whole
    image). An all-zero map is a valid YODA input: the lower bound ``l`` of Eq. 9
    still diffuses every pixel for ``floor(T * l)`` steps.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.size == 0:
        return raw.astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    if hi - lo <= eps:
        fill = 1.0 if hi > eps else 0.0
        return np.full(raw.shape, fill, dtype=np.float32)
    return np.clip((raw - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _init_parameters(cls) -> List[inspect.Parameter]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class AttentionSource:
    """Base class of attention sources (see the module docstring for the contract).

    Subclasses set ``name``, store every constructor argument under an attribute
    of the same name (``config()`` reads them back) and implement
    :meth:`compute`, which receives the validated image from :meth:`prepare`
    (RGB ``uint8`` ``(H, W, 3)`` by default) and returns a map of shape
    ``(H, W)``. ``__call__`` checks that shape, clips to [0, 1] and returns
    ``float32``.
    """

    name: str = ''

    def prepare(self, image) -> np.ndarray:
        """Validate and convert the input image; RGB uint8 ``(H, W, 3)`` by default."""
        return as_rgb_uint8(image)

    def compute(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, image) -> np.ndarray:
        prepared = self.prepare(image)
        h, w = prepared.shape[:2]
        amap = np.asarray(self.compute(prepared))
        if amap.shape != (h, w):
            raise RuntimeError(f'{type(self).__name__} returned a map of shape {amap.shape} '
                               f'for an image of size {(h, w)}')
        amap = amap.astype(np.float32)
        if not np.isfinite(amap).all():
            raise RuntimeError(f'{type(self).__name__} produced NaN or Inf values for an image of size {(h, w)}')
        return np.clip(amap, 0.0, 1.0)

    def batch(self, images: list) -> list:
        """Maps for a list of images; a plain loop here (GPU sources batch)."""
        return [self(image) for image in images]

    def config(self) -> dict:
        """``{'name': ..., <every constructor parameter>: value}`` as JSON types."""
        cfg = {'name': self.name}
        for param in _init_parameters(type(self)):
            cfg[param.name] = getattr(self, param.name)
        return to_json(cfg)

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'name')
        return f'{type(self).__name__}({args})'


def register_attention_source(cls):
    """Class decorator: register ``cls`` in :data:`ATTENTION_SOURCES` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionSource)):
        raise TypeError(f'{cls!r} is not an AttentionSource subclass')
    name = getattr(cls, 'name', '')
    if not isinstance(name, str) or not name:
        raise ValueError(f'{cls.__name__} needs a non-empty string attribute "name" to be registered')
    known = ATTENTION_SOURCES.get(name)
    if known is not None and known is not cls and \
            (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f'attention source name {name!r} is already registered by '
                         f'{known.__module__}.{known.__qualname__}')
    ATTENTION_SOURCES[name] = cls
    return cls


def build_attention_source(name: str, **kwargs) -> AttentionSource:
    """Instantiate the registered source ``name`` with ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known sources) and for
    keyword arguments the source does not take (naming them and the accepted
    ones). Invalid parameter values raise ``ValueError`` from the constructor.
    """
    cls = ATTENTION_SOURCES.get(name)
    if cls is None:
        known = ', '.join(sorted(ATTENTION_SOURCES)) or '(none)'
        raise ValueError(f'unknown attention source {name!r}; known sources: {known}')
    params = _init_parameters(cls)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    accepted = [p.name for p in params]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(f'unknown option(s) {", ".join(unknown)} for attention source {name!r}; '
                         f'accepted options: {", ".join(accepted) or "(none)"}')
    return cls(**kwargs)


def build_attention_source_from_config(config: dict) -> AttentionSource:
    """Inverse of :meth:`AttentionSource.config`: ``build_attention_source(config['name'], **rest)``."""
    if not isinstance(config, dict) or 'name' not in config:
        raise ValueError(f'an attention source config must be a dict with a "name" entry, got {config!r}')
    kwargs = {k: v for k, v in config.items() if k != 'name'}
    return build_attention_source(config['name'], **kwargs)


class _SourceOptLoader(yaml.SafeLoader):
    """YAML's safe loader, reading numbers as YAML 1.2 does and ``none`` as null.

    PyYAML (YAML 1.1) reads ``1e-1`` as the string '1e-1': a float needs a dot there. On a command line
    ``sigma=1e-1`` means 0.1, as in JSON. ``none`` is what Python users type for null.
    """


_SourceOptLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float', re.compile(r'^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$'), list('-+.0123456789'))
_SourceOptLoader.add_implicit_resolver('tag:yaml.org,2002:null', re.compile(r'^(none|None|NONE)$'), list('nN'))
_PLAIN_TYPES = (str, int, float, bool, type(None), list, dict)


def _plain(value) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN_TYPES)


def parse_source_opts(pairs) -> dict:
    """``['key=value', ...]`` (``--source-opt``) -> ``{key: value}`` for :func:`build_attention_source`.

    Values are read as YAML scalars and flow collections are (``0.3``, ``5``, ``true``, ``null``, ``[0, 2]``),
    with ``1e-1`` a float and ``none`` null (see :class:`_SourceOptLoader`); anything else (``max``, a path,
    a date) stays the text given. A pair without ``=`` or a key given twice raises ``ValueError``.
    """
    opts = {}
    for pair in pairs or []:
        key, sep, text = str(pair).partition('=')
        key = key.strip()
        if not sep or not key:
            raise ValueError(f'--source-opt expects key=value, got {pair!r}')
        if key in opts:
            raise ValueError(f'--source-opt {key} given twice')
        try:
            value = yaml.load(text, Loader=_SourceOptLoader)
        except yaml.YAMLError:
            value = text.strip()
        opts[key] = value if _plain(value) else text.strip()
    return opts


# Registration of the built-in sources (imports the names defined above).
from .deterministic import EdgeAttention, GaussianAttention, SiftAttention  # noqa: E402
from .dino import DinoResNet50Attention, DinoViTS8Attention  # noqa: E402,F401
