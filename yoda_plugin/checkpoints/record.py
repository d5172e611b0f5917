"""The record a checkpoint carries beside its weights: what rebuilding its network and pipeline needs.

Every checkpoint the project writes (training's ``net_g_*.pth``, the demo's shipped models, the converged
models of the convergence benchmark, ``scripts/convert_checkpoint.py``'s output) holds, next to BasicSR's
``params`` / ``params_ema``, a ``yoda_record``: plain types only, so ``torch.load(weights_only=True)`` and
BasicSR's own ``load_network`` (which reads ``params`` / ``params_ema`` and ignores the rest) still read the
file. Format 1:

==============  ==================================================================================
``format``      1
``model_type``  the BasicSR model class (it names the backbone: ``SR3Model``, ``SRDiffModel``)
``scale``       the SR scale
``network_g``   the network options
``diffusion``   the diffusion section (training schedule, ``sample_steps``, variance, clipping)
``yoda``        the YODA section
``<section>``   the backbone's own section, when it has one (``srdiff``)
``attention``   the dataset's ``attention_meta`` (e.g. ``{'source': {'name': 'edge'}}``)
``resize``      the dataset's bicubic mode of up(LR) (``pil``, ``cv2``, ``matlab``)
``sampler``     the options' ``val.sampler`` (None: DDPM on ``diffusion.sample_steps``)
``colour_fix``  the options' ``val.colour_fix``, when set
==============  ==================================================================================

and whatever the writer adds about how the weights were made (``training``, ``validation``, ``check``,
``converted_from``). :func:`make_record` builds it from an option dict, :func:`record_options` turns it back
into one, :func:`read_record` reads it from a file and :func:`compare_record` lists where an option file
disagrees with it.
"""
import copy
import inspect
from dataclasses import asdict, is_dataclass
from typing import List, Optional, Tuple

import torch

from ..utils.torch_io import load_checkpoint

RECORD_KEY = 'yoda_record'
RECORD_FORMAT = 1
REQUIRED_KEYS = ('model_type', 'scale', 'network_g', 'diffusion', 'yoda')
# diffusion keys that define the training schedule, the network's time input and output: the weights depend on them.
SCHEDULE_KEYS = ('schedule', 'num_timesteps', 'linear_start', 'linear_end', 'cosine_s', 'continuous_noise_level',
                 'prediction')


class RecordError(ValueError):
    """A checkpoint's record is unreadable, of a newer format, or an option file disagrees with it."""


def _plain(value):
    """Dicts, lists, str / int / float / bool / None and CPU tensors: what ``weights_only=True`` reads back."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, 'item'):  # numpy scalars
        return value.item()
    return str(value)


def record_dataset(opt: dict) -> dict:
    """The dataset whose ``attention_meta`` and ``resize`` the record keeps: the first validation / test one,
    else the training one (all of one run's datasets are prepared alike)."""
    datasets = [(phase, ds) for phase, ds in (opt.get('datasets') or {}).items() if isinstance(ds, dict)]
    for phase, ds in sorted(datasets, key=lambda item: str(item[0]).startswith('train')):
        return ds
    return {}


def make_record(opt: dict, **extra) -> dict:
    """The format-1 record of an option dict (``model_type``, ``scale``, ``network_g``, ``diffusion``, ``yoda``,
    the backbone's section, the dataset's ``attention_meta`` and ``resize``, ``val.sampler`` / ``colour_fix``);
    ``extra`` entries (``training``, ``validation``, ...) are added as they are. Plain types only."""
    from ..config import backbone_of
    missing = [k for k in ('model_type', 'scale', 'network_g') if opt.get(k) is None]
    if missing:
        raise RecordError(f'cannot record the options: they lack {", ".join(missing)}')
    backbone = backbone_of(opt)
    ds = record_dataset(opt)
    val = opt.get('val') or {}
    record = {'format': RECORD_FORMAT, 'model_type': opt['model_type'], 'scale': opt['scale'],
              'network_g': opt['network_g'], 'diffusion': opt.get('diffusion') or {}, 'yoda': opt.get('yoda'),
              'attention': ds.get('attention_meta') or {}, 'resize': ds.get('resize', 'pil'),
              'sampler': val.get('sampler')}
    if backbone.section:
        record[backbone.section] = opt.get(backbone.section)
    if val.get('colour_fix'):
        record['colour_fix'] = val['colour_fix']
    record.update(extra)
    return _plain(record)


def check_record(record, where: str) -> dict:
    """``record`` if it is a format this code reads, else :class:`RecordError` naming ``where``."""
    if not isinstance(record, dict):
        raise RecordError(f'{where}: {RECORD_KEY} must be a mapping, got {type(record).__name__}')
    fmt = record.get('format')
    if not isinstance(fmt, int) or fmt < 1:
        raise RecordError(f'{where}: {RECORD_KEY}.format must be a positive integer, got {fmt!r}')
    if fmt > RECORD_FORMAT:
        raise RecordError(f'{where}: {RECORD_KEY} has format {fmt}, this yoda_plugin reads format {RECORD_FORMAT} '
                          f'and older: update yoda_plugin, or pass --opt with the option file of the checkpoint')
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise RecordError(f'{where}: {RECORD_KEY} lacks {", ".join(missing)} (expected {", ".join(REQUIRED_KEYS)})')
    return record


def record_of(obj, where: str) -> Optional[dict]:
    """The record of a loaded checkpoint (``torch.load``'s result), checked; None when it has none."""
    if not isinstance(obj, dict) or RECORD_KEY not in obj:
        return None
    return check_record(obj[RECORD_KEY], where)


def read_record(path: str, trusted: bool = False) -> Optional[dict]:
    """The record of the checkpoint file ``path`` (loaded with ``weights_only=True`` unless ``trusted``); None
    when the file has none (an older checkpoint: it needs its option file)."""
    return record_of(load_checkpoint(path, weights_only=not trusted), path)


def record_options(record: dict) -> dict:
    """An option dict that builds the record's network and pipeline (``datasets.test`` holds the attention
    source and the resize mode, as a test option file would)."""
    record = copy.deepcopy(record)
    opt = {'model_type': record['model_type'], 'scale': record['scale'], 'network_g': record['network_g'],
           'diffusion': record.get('diffusion') or {}, 'yoda': record.get('yoda'),
           'datasets': {'test': {'name': 'record', 'attention_meta': record.get('attention') or {},
                                 'resize': record.get('resize') or 'pil'}},
           'val': {}}
    if record.get('sampler'):
        opt['val']['sampler'] = record['sampler']
    if record.get('colour_fix'):
        opt['val']['colour_fix'] = record['colour_fix']
    from ..config import backbone_of
    section = backbone_of(opt).section
    if section and record.get(section) is not None:
        opt[section] = record[section]
    return opt


# -- comparing an option file with a record ----------------------------------------------------------------------

def _network_defaults(network_g: dict) -> dict:
    """``network_g`` with the arch's own defaults filled in (an omitted key and its default are the same)."""
    from basicsr.utils.registry import ARCH_REGISTRY
    out = dict(network_g or {})
    try:
        cls = ARCH_REGISTRY.get(out.get('type'))
    except KeyError:
        return out
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name != 'self' and param.default is not inspect.Parameter.empty and name not in out:
            out[name] = param.default
    return out


def _sections(opt: dict) -> dict:
    """The comparable sections of an option dict (parsed: defaults filled, as the pipeline sees them)."""
    from ..config import DiffusionConfig, backbone_of
    from ..core.yoda import YODAConfig
    backbone = backbone_of(opt)
    sections = {'model_type': opt.get('model_type'), 'scale': opt.get('scale'),
                'network_g': _network_defaults(opt.get('network_g')),
                'diffusion': DiffusionConfig.from_options(opt.get('diffusion'), backbone.diffusion_defaults).as_dict(),
                'yoda': YODAConfig.from_options(opt.get('yoda')).as_dict()}
    if backbone.section:
        sections[backbone.section] = backbone.config.from_options(opt.get(backbone.section)).as_dict()
    ds = record_dataset(opt)
    sections['attention'] = {'source': _plain((ds.get('attention_meta') or {}).get('source'))}
    sections['resize'] = ds.get('resize', 'pil')
    return sections


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _differences(a, b, prefix: str, out: List[Tuple[str, object, object]]):
    if isinstance(a, dict) and isinstance(b, dict) and prefix not in ('attention.source', ):
        for key in sorted(set(a) | set(b), key=str):
            _differences(a.get(key), b.get(key), f'{prefix}.{key}' if prefix else str(key), out)
    elif not _same(a, b):
        out.append((prefix, a, b))


def record_differences(record: dict, opt: dict) -> List[Tuple[str, object, object]]:
    """``(dotted key, the record's value, the options' value)`` for every key where they disagree."""
    out: List[Tuple[str, object, object]] = []
    mine, theirs = _sections(record_options(record)), _sections(opt)
    if mine['model_type'] != theirs['model_type']:  # another backbone: its sections are not comparable
        return [('model_type', mine['model_type'], theirs['model_type'])]
    _differences(mine, theirs, '', out)
    return out


def compare_record(record: dict, opt: dict) -> List[str]:
    """The dotted keys (``network_g.base_channels``, ``diffusion.num_timesteps``, ``yoda.lower_bound``,
    ``attention.source``, ``resize``, ...) where the option dict ``opt`` disagrees with ``record``; omitted
    keys count as their defaults."""
    return [key for key, _, _ in record_differences(record, opt)]


def defines_weights(key: str) -> bool:
    """Whether a differing key changes what the weights compute (network, backbone section, training schedule,
    scale, up(LR)'s resize mode), rather than only how they are sampled (YODA, sample steps, attention source)."""
    head, _, rest = key.partition('.')
    if head == 'diffusion':
        return rest in SCHEDULE_KEYS
    return head not in ('yoda', 'attention')


def describe_differences(differences, limit: int = 6) -> str:
    """``key (record value vs option value), ...`` on one line."""
    text = ', '.join(f'{k} ({a!r} in the checkpoint, {b!r} in the option file)' for k, a, b in differences[:limit])
    return text + (f' and {len(differences) - limit} more' if len(differences) > limit else '')


__all__ = ['RECORD_KEY', 'RECORD_FORMAT', 'RecordError', 'check_record', 'compare_record', 'defines_weights',
           'describe_differences', 'make_record', 'read_record', 'record_differences', 'record_of',
           'record_options']
