"""Helpers shared by the analysis scripts (and scripts/inference_yoda.py).

Reading attention LMDBs, option files, datasets and result folders; building
the inference object (YODAResolver) of an option file and a checkpoint; saving matplotlib figures
with the Agg backend.
"""
import copy
import os
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

import yoda_plugin  # noqa: E402,F401  (registers everything, torchvision shim)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    plt.close(fig)
    print(f'wrote {path}')
    return path


def label_and_path(spec: str) -> Tuple[str, str]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder name)."""
    label, sep, path = spec.partition('=')
    if sep and label and not os.path.exists(spec):
        return label, path
    return os.path.basename(os.path.normpath(spec)), spec


# ----------------------------------------------------------------------------------------------- options

def parse_sparse_spec(spec: str) -> Tuple[str, int]:
    """``MODE:MARGIN`` (e.g. ``regions:8``) of sparse sampling, as (mode, margin); argparse type."""
    import argparse
    mode, sep, margin = spec.partition(':')
    if not sep or mode not in ('bbox', 'regions') or not margin.isdigit():
        raise argparse.ArgumentTypeError(f'sparse variant {spec!r}: expected MODE:MARGIN with MODE bbox or regions '
                                         f'and MARGIN an integer >= 0 (pixels), e.g. regions:8')
    return mode, int(margin)


def load_options(path: str) -> dict:
    from yoda_plugin.utils.options import load_options as _load
    return _load(path)


def yoda_timing(opt: Optional[dict] = None, lower_bound=None, num_timesteps=None, sample_steps=None):
    """(l, T_train, T_eval) from an option dict (SR3Model defaults), each overridable."""
    from yoda_plugin.config import DIFFUSION_DEFAULTS
    diff = dict(DIFFUSION_DEFAULTS, **((opt or {}).get('diffusion') or {}))
    yoda = (opt or {}).get('yoda') or {}
    lb = lower_bound if lower_bound is not None else yoda.get('lower_bound', 0.4)
    T = num_timesteps if num_timesteps is not None else diff['num_timesteps']
    K = sample_steps if sample_steps is not None else diff['sample_steps']
    return float(lb), int(T), int(K)


def sampling_timesteps(num_timesteps: int, sample_steps: int):
    """Training time steps [0, t_1, ..., t_K] of the sampling grid (as SR3Model respaces)."""
    from yoda_plugin.core import space_timesteps
    return space_timesteps(num_timesteps, sample_steps)


def pick_dataset(opt: dict, name: Optional[str] = None) -> Tuple[str, dict]:
    """The dataset section called ``name`` (section key or dataset name); default: first test/val section."""
    sets = opt.get('datasets') or {}
    if name is not None:
        for key, ds in sets.items():
            if name in (key, ds.get('name')):
                return key, ds
        raise ValueError(f'no dataset {name!r} in the options; have {[(k, d.get("name")) for k, d in sets.items()]}')
    for key, ds in sets.items():
        if key.split('_')[0] in ('test', 'val'):
            return key, ds
    if sets:
        return next(iter(sets.items()))
    raise ValueError('the option file has no datasets section')


def build_dataset(opt_path: Optional[str] = None, dataset: Optional[str] = None, hr: Optional[str] = None,
                  lr: Optional[str] = None, attention: Optional[str] = None, scale: Optional[int] = None,
                  require_attention: bool = False):
    """A YODAPairedDataset (phase test, whole images) from an option file and/or explicit data paths.

    ``hr``/``lr`` are image folders or BasicSR LMDBs (both of one kind), ``attention`` an attention LMDB;
    they override the option file's dataset section.
    """
    from yoda_plugin.data.yoda_paired_dataset import YODAPairedDataset
    opt = load_options(opt_path) if opt_path else {}
    if opt:
        _, ds = pick_dataset(opt, dataset)
        ds = copy.deepcopy(dict(ds))
    else:
        ds = {'name': 'data', 'type': 'YODAPairedDataset'}
    if hr:
        ds['dataroot_gt'] = hr
        ds['io_backend'] = {'type': 'lmdb' if is_lmdb(hr) else 'disk'}
        ds.pop('dataroot_lq', None)
    if lr:
        ds['dataroot_lq'] = lr
    if attention:
        ds['dataroot_attention'] = attention
        ds.pop('attention_meta', None)
    if 'dataroot_gt' not in ds:
        raise ValueError('no HR images: give --opt with a dataset section or --hr')
    if require_attention and not ds.get('dataroot_attention'):
        raise ValueError('no attention maps: give --attention or an option file whose dataset has dataroot_attention')
    ds.update(phase='test', scale=int(scale or opt.get('scale') or 0) or None, gt_size=None, use_hflip=False,
              use_rot=False)
    for k in ('batch_size_per_gpu', 'num_worker_per_gpu', 'use_shuffle', 'dataset_enlarge_ratio', 'prefetch_mode'):
        ds.pop(k, None)
    ds['type'] = 'YODAPairedDataset'
    return YODAPairedDataset(ds)


def is_lmdb(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'data.mdb'))


# ----------------------------------------------------------------------------------------------- attention

def lmdb_keys(path: str) -> List[str]:
    from yoda_plugin.data.attention_lmdb import read_meta_info
    if not is_lmdb(path):
        raise FileNotFoundError(f'{path} is not an LMDB folder (no data.mdb)')
    return [key for key, _, _ in read_meta_info(path)]


def read_attention_maps(path: str, keys: Optional[Sequence[str]] = None,
                        max_images: Optional[int] = None) -> Dict[str, np.ndarray]:
    """key -> float32 (H, W) map in [0, 1] from an attention LMDB (keys from its meta_info.txt by default)."""
    from yoda_plugin.data.attention_lmdb import decode_attention
    from yoda_plugin.data.lmdb_reader import lmdb_get
    keys = list(keys) if keys is not None else lmdb_keys(path)
    if max_images:
        keys = keys[:max_images]
    out = {}
    for key in keys:
        value = lmdb_get(path, key)
        if value is None:
            raise KeyError(f'no attention map for key {key!r} in {path}')
        out[key] = decode_attention(bytes(value), key)
    if not out:
        raise ValueError(f'{path} holds no attention maps')
    return out


def attention_grid(path: str) -> str:
    """The grid recorded in an attention LMDB's metadata ('lr', 'scaled', 'fixed'; 'lr' if unknown)."""
    from yoda_plugin.data.attention_lmdb import read_attention_meta
    try:
        return read_attention_meta(path).get('grid', 'lr')
    except ValueError:
        return 'lr'


def to_hr_grid(amap: np.ndarray, scale: Optional[int]) -> np.ndarray:
    """Bilinear resize of an LR-grid map by ``scale``, as YODAPairedDataset does (no-op without scale)."""
    from yoda_plugin.data.transforms import resize_attention
    if not scale or scale == 1:
        return amap
    return resize_attention(amap, (amap.shape[0] * scale, amap.shape[1] * scale))


# ----------------------------------------------------------------------------------------------- results

def read_rgb(path: str) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 1]; ValueError if unreadable."""
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f'cannot read image {path}')
    return img[:, :, ::-1].astype(np.float32) / 255.0


def result_image_folder(path: str) -> str:
    """``results/<name>`` -> its ``visualization/<dataset>`` folder when that is unambiguous; else ``path``."""
    vis = os.path.join(path, 'visualization')
    if os.path.isdir(vis):
        subs = [d for d in sorted(os.listdir(vis)) if os.path.isdir(os.path.join(vis, d))]
        if len(subs) == 1:
            return os.path.join(vis, subs[0])
        raise ValueError(f'{vis} holds several datasets {subs}: pass the folder of one')
    return path


def result_names(dataset) -> Dict[str, str]:
    """key -> the image name SR3Model uses for it in results: the stem of the dataset's ``lq_path``."""
    return {k: os.path.splitext(os.path.basename(str(dataset.lq_paths.get(k, dataset.gt_paths[k]))))[0]
            for k in dataset.keys}


def find_sr_images(folder: str, keys: Sequence[str], suffix: Optional[str] = None,
                   names: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """key -> SR image path in a test result folder (files ``<name>_<suffix>.png`` as SR3Model writes them).

    ``names`` maps keys to the image names used in the results (default: the key; see :func:`result_names`).
    Without ``suffix`` the most common suffix among the files is used (``_attention`` files are ignored).
    Keys without an image are left out.
    """
    names = names or {}
    folder = result_image_folder(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'result folder {folder} does not exist')
    stems = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
             if f.lower().endswith(IMAGE_EXTENSIONS)}
    if suffix is None:
        counts = Counter()
        for key in keys:
            name = names.get(key, key)
            for stem in stems:
                if stem.startswith(name + '_') and stem != f'{name}_attention':
                    counts[stem[len(name) + 1:]] += 1
        if counts:
            suffix = counts.most_common(1)[0][0]
    out = {}
    for key in keys:
        name = names.get(key, key)
        for stem in ((f'{name}_{suffix}', ) if suffix else ()) + (name, ):
            if stem in stems:
                out[key] = stems[stem]
                break
    return out


# ----------------------------------------------------------------------------------------------- model

def build_resolver(opt_path: str, checkpoint: Optional[str] = None, param_key: str = 'params_ema',
                   device: str = 'cpu', sample_steps: Optional[int] = None, **overrides):
    """``yoda_plugin.YODAResolver`` of an option file and a checkpoint (default: ``path.pretrain_network_g``);
    ``sample_steps`` overrides the sampler's steps, ``overrides`` are the resolver's (sampler, sparse, ...)."""
    from yoda_plugin import YODAResolver
    if sample_steps is not None:
        overrides['sample_steps'] = int(sample_steps)
        sampler = dict(((load_options(opt_path).get('val') or {}).get('sampler')) or {})
        if sampler.get('steps') is not None and 'sampler' not in overrides:
            overrides['sampler'] = {**sampler, 'steps': int(sample_steps)}
    return YODAResolver.from_options(opt_path, checkpoint, param_key, device, **overrides)
