"""Preparing the paper's datasets: the logic of ``scripts/prepare_data.py`` (its docstring is the user documentation).

Scenarios
---------
* :func:`face_jobs`: a folder of FFHQ or CelebA-HQ images becomes ``<root>/FFHQ/`` (or ``<root>/CelebA-HQ/``
  with ``val``): ``lr_16.lmdb``, ``hr_128.lmdb``, ``lr_64.lmdb``, ``hr_256.lmdb``, ``hr_512.lmdb``. As SR3's data
  preparation (Janspiry's ``data/prepare_data.py``), every size is made from the original image directly: the
  short side is resized to the size with Pillow's bicubic filter (aspect kept, the long side truncated to an
  int), then the centre square is cut (:func:`sr3_resize`). LR and HR are two such resizes of one original.
* :func:`df2k_jobs`: DIV2K/Flickr2K HR folders become ``<root>/DF2K/DF2K_HR_sub320.lmdb`` and
  ``DF2K_LR_bicubic_X4_sub80.lmdb``, as SRDiff's ``data_gen/df2k.py``: the HR image is cropped to a multiple of
  4 (top left kept), its LR is MATLAB's bicubic ``imresize(HR, 1/4)`` of the whole image on uint8 data
  (:func:`matlab_imresize`: rounded after each of the two passes, as MATLAB and SRDiff's port do; BasicSR's
  float ``imresize``, rounded once, differs by up to a few levels on ~10% of the pixels), and 320x320 HR /
  80x80 LR sub-images are cut at the same places (:func:`subimage_starts`: step 320,
  a start is used while it lies more than 160 pixels before the far border). SRDiff keeps the last, shorter
  sub-image of a row or column (160..319 pixels); we move it back inside the image so that every sub-image is
  320x320 (same count, same pixels covered). DIV2K validation images are stored whole (cropped to a multiple
  of 4), with their MATLAB-bicubic LR, in ``<root>/DIV2K/DIV2K_valid_HR.lmdb`` / ``DIV2K_valid_LR_bicubic_X4.lmdb``.
* Attention: :func:`attention_jobs` runs :func:`yoda_plugin.attention.precompute.run` on each LR LMDB made,
  into ``attention_<tag>_<lr>.lmdb`` (faces), ``attention_<tag>_sub80.lmdb`` (DF2K) and
  ``attention_<tag>_valid_X4.lmdb`` (DIV2K), the names the option files read.

Resuming and idempotence
------------------------
Each image LMDB gets ``yoda_prepare.json`` (its recipe) before any image; a folder holding an LMDB without it,
or with another recipe, is refused. Images are committed ``commit_every`` inputs at a time
(:func:`yoda_plugin.data.attention_lmdb.commit_pairs`, which grows the map), so an interrupted run keeps what
it committed; a rerun skips keys already present. When every input went in, ``yoda_prepare_complete.json``
records a fingerprint of the inputs (keys, file sizes, modification times) and the recipe: a rerun whose
fingerprint matches does nothing for that LMDB, not even reading image headers. An attention LMDB is marked
complete with the fingerprint of its LR LMDB. Each LMDB folder is locked while written
(:class:`yoda_plugin.utils.filelock.FileLock`).

Workers (``fork`` where available) decode, resize and PNG-encode; the main process alone writes. They are
started before any attention source runs, so no torch thread pool exists when they fork.
"""
import hashlib
import json
import multiprocessing
import os
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import lmdb
import numpy as np

from ..utils.disk import DISK_FULL_EXIT_CODE, DiskFullError, disk_full_error, raise_if_disk_full
from ..utils.filelock import FileLock, LockHeldError
from .attention_lmdb import (META_INFO_FILE, _atomic_write_text, _png_size, check_attention_meta, commit_pairs,
                             read_meta_info, validate_key)
from .transforms import bicubic_resize

RECIPE_FILE = 'yoda_prepare.json'
COMPLETE_FILE = 'yoda_prepare_complete.json'
LOCK_FILE = 'yoda_prepare.lock'
FORMAT = 'yoda-prepare-v1'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm')

#: face scenarios: name -> (LR size, HR size), as in options/{train,test}_sr3*.yml
FACE_SCENARIOS = {'16_128': (16, 128), '64_256': (64, 256), '64_512': (64, 512)}
DF2K_SCALE = 4
SUB_SIZE, SUB_STEP, SUB_THRESH = 320, 320, 160  # SRDiff configs/df2k4x.yaml: crop_size, (step), thresh_size
MIN_VAL_SIDE = 16
INITIAL_MAP_SIZE = 1 << 30  # grows as needed (commit_pairs)


class UsageError(ValueError):
    """Bad options or inputs that stop the run before any image is written (exit status 2)."""


class RefusedImage(ValueError):
    """An input image that cannot give the requested outputs (reported with its path, skipped, exit status 1)."""


# --------------------------------------------------------------------------- resizing recipes

def sr3_resize(img: np.ndarray, size: int) -> np.ndarray:
    """SR3's ``resize_and_convert``: short side to ``size`` (Pillow bicubic, aspect kept, long side
    ``int(size * long / short)`` as torchvision computes it), then the centre ``size`` x ``size`` square (top/left
    offset ``round((side - size) / 2)``). Square inputs are a single Pillow bicubic resize."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    out = bicubic_resize(img, (new_h, new_w), 'pil')
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(out[top:top + size, left:left + size])


def subimage_starts(length: int, size: int = SUB_SIZE, step: int = SUB_STEP, thresh: int = SUB_THRESH) -> List[int]:
    """Sub-image starts along one axis: SRDiff's ``0, step, ...`` while ``start < length - thresh``, each clamped
    to ``length - size`` so that every sub-image lies inside the image. Needs ``length >= size``."""
    starts, x = [], 0
    while x < length - thresh:
        starts.append(min(x, length - size))
        x += step
    return starts


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel with a = -0.5 (MATLAB's bicubic)."""
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1) +
            (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def matlab_resize_matrix(in_len: int, scale: float) -> np.ndarray:
    """(out_len, in_len) weights of MATLAB's ``imresize(..., scale, 'bicubic')`` along one axis: output pixel j
    (1-based) sits at ``j / scale + (1 - 1 / scale) / 2`` of the input; when shrinking the kernel is stretched by
    1 / scale (antialiasing); weights are normalised per output pixel; taps beyond the border are mirrored
    (symmetric padding)."""
    out_len = int(np.ceil(in_len * scale))
    shrink = scale < 1
    width = 4.0 / scale if shrink else 4.0
    centre = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(centre - width / 2)
    taps = left[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    dist = centre[:, None] - taps
    weights = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    mirrored = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    index = mirrored[np.mod(taps.astype(np.int64) - 1, 2 * in_len)]
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.repeat(np.arange(out_len), taps.shape[1]), index.ravel()), weights.ravel())
    return matrix


def matlab_imresize(img: np.ndarray, scale: float, quantize: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiased) of an HxWxC uint8 image: rows first, then columns.

    With ``quantize`` (MATLAB on uint8 images, hence DIV2K's official LR images and SRDiff's port) the result
    of each pass is rounded and clipped to uint8; without it, one float result (BasicSR's ``imresize``).
    """
    out = img.astype(np.float64)
    for axis in (0, 1):
        m = matlab_resize_matrix(out.shape[axis], scale)
        out = np.tensordot(m, out, axes=([1], [axis]))  # the resized axis comes first
        out = np.moveaxis(out, 0, axis)
        if quantize:
            out = np.round(np.clip(out, 0, 255))
    return out.astype(np.uint8) if quantize else out


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """The top-left part whose sides are multiples of ``scale`` (SRDiff: ``img[:h - h % s, :w - w % s]``)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def encode_png(img: np.ndarray, compress_level: int) -> bytes:
    """RGB uint8 -> PNG bytes (BGR order for cv2), as :func:`yoda_plugin.data.lmdb_images.write_image_lmdb`."""
    ok, buf = cv2.imencode('.png', np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise ValueError(f'cannot PNG-encode an image of shape {img.shape}')
    return buf.tobytes()


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 with Pillow (``convert('RGB')``, as SR3 and SRDiff read their data)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert('RGB'))


def image_size(path: str) -> Tuple[int, int]:
    """(h, w) from the file header (no decoding)."""
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
    return h, w


# --------------------------------------------------------------------------- jobs

@dataclass
class ImageTarget:
    """One image LMDB a job writes."""
    path: str
    recipe: dict


@dataclass
class InputImage:
    key: str
    path: str


@dataclass
class ImageJob:
    """Inputs -> image LMDBs. ``kind``: ``faces`` (one resize per target), ``df2k_train`` (HR/LR sub-images) or
    ``div2k_val`` (whole HR/LR). ``params`` go to the workers."""
    name: str
    kind: str
    inputs: List[InputImage]
    targets: List[ImageTarget]
    params: dict


@dataclass
class AttentionJob:
    """An attention source run on the LR LMDB ``lr_path`` into ``path``."""
    name: str
    source: str
    source_opts: dict
    lr_path: str
    path: str


@dataclass
class Plan:
    image_jobs: List[ImageJob]
    attention_jobs: List[AttentionJob]
    roots: List[str]  # dataset folders, for the disk total


@dataclass
class Report:
    """What a run did, for the summary."""
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stages: List[Tuple[str, str, float]] = field(default_factory=list)  # (stage, what happened, seconds)
    attention_status: int = 0


def list_images(folder: str, recursive: bool = True) -> List[InputImage]:
    """Image files under ``folder`` (recursive: FFHQ ships in sub-folders of 1000), sorted by key = file stem."""
    if not os.path.isdir(folder):
        raise UsageError(f'input folder {folder} does not exist')
    found: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith('.lmdb'))
        if not recursive:
            dirnames[:] = []
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            if stem in found:
                raise UsageError(f'{found[stem]} and {path} have the same key {stem!r} (keys are file names without '
                                 'extension); remove one of them')
            found[stem] = path
    if not found:
        raise UsageError(f'input folder {folder} holds no images (files ending in {", ".join(IMAGE_EXTENSIONS)})')
    return [InputImage(k, found[k]) for k in sorted(found)]


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _refuse_output_inside_input(outputs: Sequence[str], inputs: Sequence[str]) -> None:
    for out in outputs:
        for inp in inputs:
            if _inside(out, inp):
                raise UsageError(f'the output {out} lies inside the input folder {inp}; write the LMDBs elsewhere '
                                 '(e.g. --output datasets next to the image folder)')


def parse_attention_spec(spec: str) -> Tuple[str, dict, str]:
    """``SOURCE[:HEADS]`` -> (source name, options, LMDB tag): ``dino_resnet50:max`` -> tag ``dino_resnet50_max``,
    ``dino_vits8:3`` -> ``dino_vits8_head3``, ``edge`` -> ``edge`` (the names of options/ and options/ablation/)."""
    import inspect

    from yoda_plugin.attention import ATTENTION_SOURCES
    from yoda_plugin.attention.precompute import load_attention_sources
    load_attention_sources()
    name, sep, heads = spec.partition(':')
    if name not in ATTENTION_SOURCES:
        raise UsageError(f'--attention {spec}: unknown source {name!r}; known: {", ".join(sorted(ATTENTION_SOURCES))}')
    takes_heads = 'heads' in inspect.signature(ATTENTION_SOURCES[name].__init__).parameters
    if not sep:
        if takes_heads:
            raise UsageError(f'--attention {spec}: {name} needs its heads, e.g. {name}:max, {name}:avg or {name}:0')
        return name, {}, name
    if not takes_heads:
        raise UsageError(f'--attention {spec}: source {name!r} has no heads; write just {name}')
    value = int(heads) if heads.isdigit() else heads
    tag = f'{name}_head{value}' if isinstance(value, int) else f'{name}_{value}'
    return name, {'heads': value}, tag


def face_jobs(input_dir: str, root: str, scenarios: Sequence[str] = tuple(FACE_SCENARIOS), val: bool = False,
              name: Optional[str] = None, limit: Optional[int] = None, compress_level: int = 1,
              attention: Sequence[str] = (), attention_opts: Optional[Dict[str, dict]] = None) -> Plan:
    """The jobs of ``prepare_data.py faces``."""
    unknown = [s for s in scenarios if s not in FACE_SCENARIOS]
    if unknown or not scenarios:
        raise UsageError(f'--scenarios: unknown {unknown}; choose from {", ".join(FACE_SCENARIOS)}')
    folder = os.path.join(root, name or ('CelebA-HQ' if val else 'FFHQ'))
    _refuse_output_inside_input([folder], [input_dir])
    inputs = list_images(input_dir)[:limit] if limit else list_images(input_dir)
    lr_sizes = sorted({FACE_SCENARIOS[s][0] for s in scenarios})
    hr_sizes = sorted({FACE_SCENARIOS[s][1] for s in scenarios})
    sizes = [('lr', s) for s in lr_sizes] + [('hr', s) for s in hr_sizes]
    recipe = {'format': FORMAT, 'scenario': 'faces', 'resize': 'sr3: Pillow bicubic, short side, centre crop'}
    targets = [ImageTarget(os.path.join(folder, f'{role}_{s}.lmdb'), {**recipe, 'size': s}) for role, s in sizes]
    job = ImageJob(f'{os.path.basename(folder)} faces', 'faces', inputs, targets,
                   {'sizes': [s for _, s in sizes], 'compress_level': compress_level})
    att = []
    for spec in attention:
        source, opts, tag = parse_attention_spec(spec)
        opts = {**(attention_opts or {}).get(source, {}), **opts}
        for s in lr_sizes:
            att.append(AttentionJob(f'{os.path.basename(folder)} {tag} on lr_{s}', source, opts,
                                    os.path.join(folder, f'lr_{s}.lmdb'),
                                    os.path.join(folder, f'attention_{tag}_{s}.lmdb')))
    return Plan([job], att, [folder])


def df2k_jobs(train_dirs: Sequence[str], val_dirs: Sequence[str], root: str, limit: Optional[int] = None,
              compress_level: int = 1, attention: Sequence[str] = (),
              attention_opts: Optional[Dict[str, dict]] = None) -> Plan:
    """The jobs of ``prepare_data.py df2k``: DF2K training sub-images and/or DIV2K validation images."""
    if not train_dirs and not val_dirs:
        raise UsageError('df2k needs --train-hr (DIV2K_train_HR, Flickr2K_HR) and/or --val-hr (DIV2K_valid_HR)')
    jobs, roots, att = [], [], []
    specs = [parse_attention_spec(spec) for spec in attention]
    recipe = {'format': FORMAT, 'scale': DF2K_SCALE,
              'resize': 'matlab bicubic on uint8 (rounded per pass) of the mod-4 HR'}
    for split, dirs in (('train', train_dirs), ('val', val_dirs)):
        if not dirs:
            continue
        folder = os.path.join(root, 'DF2K' if split == 'train' else 'DIV2K')
        _refuse_output_inside_input([folder], dirs)
        inputs: Dict[str, InputImage] = {}
        for d in dirs:
            for item in list_images(d, recursive=False):
                if item.key in inputs:
                    raise UsageError(f'{inputs[item.key].path} and {item.path} have the same key {item.key!r}')
                inputs[item.key] = item
        items = [inputs[k] for k in sorted(inputs)]
        items = items[:limit] if limit else items
        if split == 'train':
            sub = {'sub_size': SUB_SIZE, 'sub_step': SUB_STEP, 'sub_thresh': SUB_THRESH}
            targets = [ImageTarget(os.path.join(folder, 'DF2K_HR_sub320.lmdb'), {**recipe, **sub, 'role': 'hr'}),
                       ImageTarget(os.path.join(folder, 'DF2K_LR_bicubic_X4_sub80.lmdb'),
                                   {**recipe, **sub, 'role': 'lr'})]
            jobs.append(ImageJob('DF2K train sub-images', 'df2k_train', items, targets,
                                 {'compress_level': compress_level}))
            lr_tag = 'sub80'
        else:
            targets = [ImageTarget(os.path.join(folder, 'DIV2K_valid_HR.lmdb'),
                                   {**recipe, 'role': 'hr', 'whole': True}),
                       ImageTarget(os.path.join(folder, 'DIV2K_valid_LR_bicubic_X4.lmdb'),
                                   {**recipe, 'role': 'lr', 'whole': True})]
            jobs.append(ImageJob('DIV2K validation', 'div2k_val', items, targets, {'compress_level': compress_level}))
            lr_tag = 'valid_X4'
        roots.append(folder)
        for source, opts, tag in specs:
            opts = {**(attention_opts or {}).get(source, {}), **opts}
            att.append(AttentionJob(f'{os.path.basename(folder)} {tag} on {lr_tag}', source, opts, targets[1].path,
                                    os.path.join(folder, f'attention_{tag}_{lr_tag}.lmdb')))
    return Plan(jobs, att, roots)


# --------------------------------------------------------------------------- planning and the workers

def expected_keys(kind: str, key: str, hw: Tuple[int, int], params: dict) -> List[List[str]]:
    """The keys an input gives in each target of its job; RefusedImage when it is too small."""
    h, w = hw
    if kind == 'faces':
        need = max(params['sizes'])
        if min(h, w) < need:
            raise RefusedImage(f'image is {w}x{h} (WxH); its short side must be at least the largest target '
                               f'size {need}')
        return [[key] for _ in params['sizes']]
    h, w = h - h % DF2K_SCALE, w - w % DF2K_SCALE
    if kind == 'df2k_train':
        if h < SUB_SIZE or w < SUB_SIZE:
            raise RefusedImage(f'image is {hw[1]}x{hw[0]} (WxH); DF2K sub-images need at least {SUB_SIZE}x{SUB_SIZE}')
        n = len(subimage_starts(h)) * len(subimage_starts(w))
        keys = [f'{key}_s{i:03d}' for i in range(1, n + 1)]
        return [keys, keys]
    if min(h, w) < MIN_VAL_SIDE:
        raise RefusedImage(f'image is {hw[1]}x{hw[0]} (WxH); validation images need sides of at least {MIN_VAL_SIDE}')
    return [[key], [key]]


def owner_key(kind: str, key: str) -> str:
    """The input key a stored key comes from (DF2K sub-image ``0001_s005`` -> ``0001``)."""
    return key.rsplit('_s', 1)[0] if kind == 'df2k_train' else key


def make_outputs(kind: str, img: np.ndarray, key: str, params: dict,
                 needed: Optional[Sequence[int]] = None) -> List[Tuple[int, str, bytes]]:
    """(target index, key, PNG bytes) for the outputs of one decoded input image (faces: only the targets in
    ``needed``, default all; HR and LR sub-images always come together)."""
    level = params['compress_level']
    if kind == 'faces':
        return [(i, key, encode_png(sr3_resize(img, s), level)) for i, s in enumerate(params['sizes'])
                if needed is None or i in needed]
    hr = np.ascontiguousarray(mod_crop(img, DF2K_SCALE))
    h, w = hr.shape[:2]
    lr = matlab_imresize(hr, 1.0 / DF2K_SCALE)
    if kind == 'div2k_val':
        return [(0, key, encode_png(hr, level)), (1, key, encode_png(lr, level))]
    out, index, lr_size = [], 0, SUB_SIZE // DF2K_SCALE
    for top in subimage_starts(h):
        for left in subimage_starts(w):
            index += 1
            sub_key = f'{key}_s{index:03d}'
            lt, ll = top // DF2K_SCALE, left // DF2K_SCALE
            out.append((0, sub_key, encode_png(hr[top:top + SUB_SIZE, left:left + SUB_SIZE], level)))
            out.append((1, sub_key, encode_png(lr[lt:lt + lr_size, ll:ll + lr_size], level)))
    return out


def _work(task):
    """Worker: (kind, key, path, params, needed targets) -> (key, path, outputs or None, error or None)."""
    kind, key, path, params, needed = task
    try:
        img = read_rgb(path)
        expected_keys(kind, key, img.shape[:2], params)  # the header may have lied
        return key, path, make_outputs(kind, img, key, params, needed), None
    except RefusedImage as err:
        return key, path, None, str(err)
    except Exception as err:  # noqa: BLE001  an unreadable image must not stop the run
        return key, path, None, f'cannot read it ({type(err).__name__}: {err})'


def _init_worker():
    # Not cv2.setNumThreads: destroying OpenCV's pool inherited through fork can hang; the workers use cv2 only
    # for PNG encoding, which runs in the calling thread. torch resets its pools in forked children.
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def _pool(workers: int):
    if workers <= 1:
        return None
    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker)


# --------------------------------------------------------------------------- LMDB folders

def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: str, value: dict) -> None:
    _atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def fingerprint(kind: str, inputs: Sequence[InputImage], recipe: dict) -> str:
    """sha1 of the recipe and every input's key, file size and modification time."""
    digest = hashlib.sha1(json.dumps([kind, recipe], sort_keys=True).encode('utf-8'))
    for item in inputs:
        st = os.stat(item.path)
        digest.update(f'{item.key}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode('utf-8'))
    return digest.hexdigest()


def lmdb_keys(path: str) -> List[str]:
    """Every key in the LMDB at ``path`` (sorted), [] when there is none yet."""
    if not os.path.isfile(os.path.join(path, 'data.mdb')):
        return []
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error:  # a dataset of this process holds it open (py-lmdb allows one environment per folder)
        from .lmdb_reader import open_lmdb
        env, owned = open_lmdb(path), False
    else:
        owned = True
    try:
        with env.begin(write=False) as txn:
            return [bytes(k).decode('utf-8') for k in txn.cursor().iternext(keys=True, values=False)]
    finally:
        if owned:
            env.close()


def write_meta_info(env, path: str, compress_level: int) -> int:
    """Rewrite BasicSR's ``meta_info.txt`` (``key.png (h,w,3) level``, sorted) from the DB; returns the key count."""
    lines = []
    with env.begin(write=False, buffers=True) as txn:
        for key, value in txn.cursor():
            h, w = _png_size(bytes(value[:24]))  # only the header page is touched
            lines.append(f'{bytes(key).decode("utf-8")}.png ({h},{w},3) {compress_level}\n')
    _atomic_write_text(os.path.join(path, META_INFO_FILE), ''.join(lines))
    return len(lines)


class _LockedFolder:
    """Holds ``<folder>/yoda_prepare.lock`` for one writer at a time."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.lock = FileLock(os.path.join(folder, LOCK_FILE))
        try:
            self.lock.acquire()
        except LockHeldError as err:
            who = f' (pid {err.holder})' if err.holder else ''
            raise UsageError(f'another prepare_data run is writing {folder}{who}; wait for it or stop it') from None

    def release(self):
        self.lock.release()


def _check_recipe(target: ImageTarget) -> None:
    """Refuse an LMDB that we did not make or made with another recipe; write the recipe into a new folder."""
    recipe_file = os.path.join(target.path, RECIPE_FILE)
    has_db = os.path.isfile(os.path.join(target.path, 'data.mdb'))
    found = read_json(recipe_file)
    if found is None and os.path.exists(recipe_file):
        raise UsageError(f'{recipe_file} is unreadable; delete {target.path} to rebuild it')
    if found is None:
        if has_db:
            raise UsageError(f'{target.path} already holds an LMDB that prepare_data did not make (no {RECIPE_FILE}); '
                             'refusing to write into it: move it away or choose another --output')
        write_json(recipe_file, target.recipe)
    elif found != target.recipe:
        diffs = [f'{k}: wanted {target.recipe.get(k)!r}, found {found.get(k)!r}'
                 for k in sorted(set(found) | set(target.recipe)) if found.get(k) != target.recipe.get(k)]
        raise UsageError(f'{target.path} was made with another recipe ({"; ".join(diffs)}); '
                         'delete it or choose another --output')


# --------------------------------------------------------------------------- running an image job

def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=1.0, file=sys.stderr)


def run_image_job(job: ImageJob, workers: int = 2, commit_every: int = 16, show_progress: bool = True,
                  log=print) -> Tuple[str, List[Tuple[str, str]]]:
    """Make (or finish) the LMDBs of ``job``; returns (what happened, [(path, reason) of failed inputs])."""
    fp = fingerprint(job.kind, job.inputs, job.targets[0].recipe)
    markers = [read_json(os.path.join(t.path, COMPLETE_FILE)) for t in job.targets]
    if all(m is not None and m.get('fingerprint') == fp for m in markers):
        return f'complete already ({markers[0]["inputs"]} inputs), nothing to do', []

    locks = []
    try:
        for t in job.targets:
            locks.append(_LockedFolder(t.path))
            _check_recipe(t)
        existing = [set(lmdb_keys(t.path)) for t in job.targets]
        input_keys = {item.key for item in job.inputs}
        for t, keys in zip(job.targets, existing):
            foreign = sorted(k for k in keys if owner_key(job.kind, k) not in input_keys)
            if foreign:
                raise UsageError(f'{t.path} holds {len(foreign)} key(s) of images that are not among this job\'s '
                                 f'inputs, e.g. {foreign[:3]} (other input folder or a smaller --limit?); '
                                 'delete it or choose another --output')
        for t in job.targets:  # from here on the LMDBs are incomplete until the marker is rewritten
            marker = os.path.join(t.path, COMPLETE_FILE)
            if os.path.exists(marker):
                os.remove(marker)

        # 1. scan: headers only, to know each input's keys and refuse small or unreadable images early
        failed, pending = [], []
        bar = _progress(len(job.inputs), f'{job.name}: scan', 'img', show_progress)
        for item in job.inputs:
            bar.update(1)
            try:
                validate_key(item.key)
                keys = expected_keys(job.kind, item.key, image_size(item.path), job.params)
            except RefusedImage as err:
                failed.append((item.path, str(err)))
                continue
            except ValueError as err:
                failed.append((item.path, f'unusable key: {err}'))
                continue
            except Exception as err:  # noqa: BLE001
                failed.append((item.path, f'cannot read it ({type(err).__name__}: {err})'))
                continue
            needed = [i for i, (ks, have) in enumerate(zip(keys, existing)) if any(k not in have for k in ks)]
            if needed:
                pending.append((item, needed))
        bar.close()
        scan_failed = len(failed)

        # 2. decode, resize, encode in the workers; commit here
        written = _write_pending(job, pending, workers, commit_every, show_progress, failed)
        if not failed:
            counts = []
            for t in job.targets:
                counts.append(len(lmdb_keys(t.path)))
                write_json(os.path.join(t.path, COMPLETE_FILE),
                           {'fingerprint': fp, 'inputs': len(job.inputs), 'keys': counts[-1], 'recipe': t.recipe,
                            'finished_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})
        skipped = len(job.inputs) - len(pending) - scan_failed
        return (f'{written} input(s) written, {skipped} already present, {len(failed)} failed'), failed
    finally:
        for lock in locks:
            lock.release()


def _write_pending(job: ImageJob, pending: List[Tuple[InputImage, List[int]]], workers: int, commit_every: int,
                   show_progress: bool, failed: List[Tuple[str, str]]) -> int:
    if not pending:
        for t in job.targets:  # a resumed run may have been stopped before meta_info.txt was written
            if os.path.isfile(os.path.join(t.path, 'data.mdb')):
                env = _open_env(t.path)
                try:
                    write_meta_info(env, t.path, job.params['compress_level'])
                except OSError as err:
                    raise_if_disk_full(err, t.path)
                    raise
                finally:
                    env.close()
        return 0
    pool = _pool(workers)  # before the environments are opened: the workers never hold one
    envs = []
    buffers: List[List[Tuple[bytes, bytes]]] = [[] for _ in job.targets]
    buffered = written = 0

    def flush():
        nonlocal buffered
        for env, t, buf in zip(envs, job.targets, buffers):
            if buf:
                commit_pairs(env, buf, path=t.path)
                buf.clear()
        buffered = 0

    bar = _progress(len(pending), f'{job.name}: images', 'img', show_progress)
    try:
        for t in job.targets:
            envs.append(_open_env(t.path))
        tasks = [(job.kind, item.key, item.path, job.params, needed) for item, needed in pending]
        results = pool.imap_unordered(_work, tasks) if pool is not None else map(_work, tasks)
        for key, path, outputs, error in results:
            bar.update(1)
            if error is not None:
                failed.append((path, error))
                continue
            for index, out_key, value in outputs:
                buffers[index].append((out_key.encode('utf-8'), value))
            buffered += 1
            written += 1
            if buffered >= commit_every:
                flush()
        flush()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        failing = sys.exc_info()[1] is not None
        for env, t in zip(envs, job.targets):
            try:  # also after an interruption: meta_info.txt lists what was committed
                write_meta_info(env, t.path, job.params['compress_level'])
                env.sync(True)
            except (lmdb.Error, OSError) as err:
                if not failing:  # a full disk here is reported as such; an earlier error keeps its place
                    raise_if_disk_full(err, t.path)
                    raise
            finally:
                env.close()
    return written


def _open_env(path: str):
    """Open (create) the image LMDB at ``path`` for writing; a full disk gives DiskFullError naming it."""
    try:
        return lmdb.open(path, map_size=INITIAL_MAP_SIZE, readahead=False, meminit=False)
    except lmdb.Error as err:
        raise_if_disk_full(err, path)
        raise


# --------------------------------------------------------------------------- attention

def preflight_attention(jobs: Sequence[AttentionJob]) -> None:
    """Fail before any image work when a source cannot be built: DINO weights must exist locally.

    DINO sources are only located (weights path), not built: building them runs torch code, which must not
    happen before the image workers fork. Deterministic sources are built (cheap) to check their options.
    """
    from yoda_plugin.attention import build_attention_source
    from yoda_plugin.attention.dino import WEIGHTS_ENV_VARS, resolve_weights
    for job in {(j.source, json.dumps(j.source_opts, sort_keys=True)): j for j in jobs}.values():
        try:
            if job.source in WEIGHTS_ENV_VARS:
                resolve_weights(job.source, job.source_opts.get('weights'))
            else:
                build_attention_source(job.source, **job.source_opts)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f'attention source {job.source}: {err}') from None


def _opt_text(value) -> str:
    return 'none' if value is None else value if isinstance(value, str) else json.dumps(value)


def run_attention_job(job: AttentionJob, device: Optional[str] = None, batch_size: int = 8,
                      show_progress: bool = True) -> Tuple[str, int]:
    """Run the precompute library on ``job`` unless its marker says it is complete for the current LR LMDB.

    Returns (what happened, status 0 / 1 / 2 as precompute's)."""
    from yoda_plugin.attention import precompute
    lr_marker = read_json(os.path.join(job.lr_path, COMPLETE_FILE))
    wanted = {'lr_fingerprint': lr_marker['fingerprint'] if lr_marker else None, 'source': job.source,
              'source_opts': job.source_opts}
    found = read_json(os.path.join(job.path, COMPLETE_FILE))
    if lr_marker is not None and found is not None and \
            {k: found.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
        return f'complete already ({found.get("keys")} maps), nothing to do', 0
    if not os.path.isfile(os.path.join(job.lr_path, 'data.mdb')):
        return f'skipped: {job.lr_path} holds no images', 1
    args = Namespace(input=job.lr_path, output=job.path, source=job.source,
                     source_opt=[f'{k}={_opt_text(v)}' for k, v in job.source_opts.items()], device=device,
                     size=None, scale=None, batch_size=batch_size, compress_level=1, map_size=64 * 1024 ** 2,
                     commit_every=64, previews=None, preview_count=0, dist_timeout=60.0,
                     no_progress=not show_progress)
    try:
        precompute.check_args(args)
        status = precompute.run(args)
    except precompute.SETUP_ERRORS as err:
        return f'error: {err}', 2
    if status == 0 and lr_marker is not None:
        keys = len(lmdb_keys(job.path))
        write_json(os.path.join(job.path, COMPLETE_FILE), {**wanted, 'keys': keys,
                                                         'finished_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                                                       time.gmtime())})
    return ('maps written' if status == 0 else 'some maps failed'), status


# --------------------------------------------------------------------------- running a plan, summary

def folder_bytes(path: str) -> int:
    """Disk used by the files under ``path`` (allocated blocks where the OS says, else sizes)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_blocks * 512 if hasattr(st, 'st_blocks') else st.st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if n < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024.0


def describe_lmdb(path: str) -> str:
    """``'<keys> keys, <size(s)>, <disk>, complete|INCOMPLETE'`` from meta_info.txt and the markers."""
    if not os.path.isfile(os.path.join(path, META_INFO_FILE)):
        return 'missing'
    rows = read_meta_info(path)
    shapes = sorted({r[1][:2] for r in rows})
    if len(shapes) == 1:
        size = f'{shapes[0][1]}x{shapes[0][0]}'
    elif shapes:
        size = f'{len(shapes)} sizes, {min(s[1] for s in shapes)}..{max(s[1] for s in shapes)} wide'
    else:
        size = 'empty'
    state = 'complete' if os.path.isfile(os.path.join(path, COMPLETE_FILE)) else 'INCOMPLETE'
    return f'{len(rows)} keys, {size}, {human_bytes(folder_bytes(path))}, {state}'


def run_plan(plan: Plan, workers: int = 2, commit_every: int = 16, device: Optional[str] = None,
             attention_batch: int = 8, show_progress: bool = True, log=print) -> int:
    """Every image job, then every attention job, then the summary. Exit status: 0; 1 when an image or a map
    failed (the rest is written); 2 for a setup error."""
    start = time.perf_counter()
    preflight_attention(plan.attention_jobs)
    report = Report()
    for job in plan.image_jobs:
        t0 = time.perf_counter()
        log(f'[prepare] {job.name}: {len(job.inputs)} input image(s) -> {", ".join(t.path for t in job.targets)}')
        what, failed = run_image_job(job, workers, commit_every, show_progress)
        report.failed += failed
        report.stages.append((job.name, what, time.perf_counter() - t0))
        log(f'[prepare] {job.name}: {what} ({time.perf_counter() - t0:.1f} s)')
    for job in plan.attention_jobs:
        t0 = time.perf_counter()
        log(f'[prepare] attention {job.name}: {job.lr_path} -> {job.path}')
        what, status = run_attention_job(job, device, attention_batch, show_progress)
        report.attention_status = max(report.attention_status, status)
        report.stages.append((f'attention {job.name}', what, time.perf_counter() - t0))
        log(f'[prepare] attention {job.name}: {what} ({time.perf_counter() - t0:.1f} s)')

    log('')
    log('[prepare] summary')
    paths = [t.path for j in plan.image_jobs for t in j.targets] + [j.path for j in plan.attention_jobs]
    width = max(len(p) for p in paths) if paths else 0
    for path in paths:
        log(f'  {path:<{width}}  {describe_lmdb(path)}')
    total = sum(folder_bytes(r) for r in plan.roots if os.path.isdir(r))
    log(f'  disk used under {", ".join(plan.roots)}: {human_bytes(total)}; {time.perf_counter() - start:.1f} s')
    if report.failed:
        log(f'[prepare] {len(report.failed)} input image(s) skipped:')
        for path, reason in report.failed:
            log(f'  {path}: {reason}')
    if report.attention_status:
        log('[prepare] some attention maps failed or could not be made (see above)')
    return max(1 if report.failed else 0, report.attention_status)


# --------------------------------------------------------------------------- checking a layout

def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _lmdb_rows(path: str, what: str, problems: List[str]) -> Optional[Dict[str, Tuple[int, ...]]]:
    if not os.path.isdir(path):
        problems.append(f'{what}: {path} does not exist')
        return None
    if not os.path.isfile(os.path.join(path, 'data.mdb')) or not os.path.isfile(os.path.join(path, META_INFO_FILE)):
        problems.append(f'{what}: {path} is not a BasicSR LMDB (needs data.mdb and {META_INFO_FILE})')
        return None
    rows = {key: shape for key, shape, _ in read_meta_info(path)}
    stored = set(lmdb_keys(path))
    missing = sorted(set(rows) - stored)
    if missing:
        problems.append(f'{what}: {path}: {len(missing)} key(s) listed in {META_INFO_FILE} are not in data.mdb, '
                        f'e.g. {missing[:3]}')
    if os.path.isfile(os.path.join(path, RECIPE_FILE)) and not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
        problems.append(f'{what}: {path} is incomplete (no {COMPLETE_FILE}); rerun the prepare_data command')
    if not rows:
        problems.append(f'{what}: {path} lists no keys')
    return rows


def _some(keys, n=3) -> str:
    keys = sorted(keys)
    return f'{len(keys)} key(s), e.g. {keys[:n]}'


def check_layout(option_file: str, root: str = '.', log=print) -> List[str]:
    """Problems of the data an option file reads (paths relative to ``root``): LMDBs present and complete, LR/HR
    keys paired, HR = scale x LR for every key, LR not smaller than a training crop, an attention map for every
    key on the LR or HR grid, attention metadata matching ``attention_meta``. Prints one line per dataset."""
    from yoda_plugin.utils.options import load_options
    opt = load_options(option_file)
    scale = opt.get('scale')
    problems: List[str] = []
    for phase, ds in (opt.get('datasets') or {}).items():
        before = len(problems)
        where = f'{option_file}: datasets.{phase}'
        if 'dataroot_gt' not in ds:
            problems.append(f'{where}: no dataroot_gt')
            continue
        gt = _lmdb_rows(_resolve(root, ds['dataroot_gt']), f'{where}.dataroot_gt', problems)
        lq = _lmdb_rows(_resolve(root, ds['dataroot_lq']), f'{where}.dataroot_lq', problems) \
            if ds.get('dataroot_lq') else None
        if gt is not None and lq is not None:
            if set(gt) != set(lq):
                problems.append(f'{where}: LR and HR keys differ: only in HR {_some(set(gt) - set(lq))}; '
                                f'only in LR {_some(set(lq) - set(gt))}')
            bad = [k for k in set(gt) & set(lq) if tuple(gt[k][:2]) != (lq[k][0] * scale, lq[k][1] * scale)]
            if bad:
                k = sorted(bad)[0]
                problems.append(f'{where}: HR size is not {scale} x LR size for {_some(bad)} '
                                f'({k}: HR {gt[k][:2]}, LR {lq[k][:2]})')
            crop = ds.get('gt_size')
            small = [k for k in lq if crop and min(lq[k][:2]) * scale < crop]
            if small:
                problems.append(f'{where}: {_some(small)} are smaller than the training crop gt_size {crop}')
        if ds.get('dataroot_attention') and gt is not None:
            att_path = _resolve(root, ds['dataroot_attention'])
            att = _lmdb_rows(att_path, f'{where}.dataroot_attention', problems)
            if att is not None:
                missing = set(gt) - set(att)
                if missing:
                    problems.append(f'{where}: no attention map for {_some(missing)} in {att_path}')
                lr_of = lq or {}
                bad = [k for k in set(gt) & set(att)
                       if tuple(att[k][:2]) not in (tuple(gt[k][:2]), tuple(lr_of.get(k, (-1, -1))[:2]))]
                if bad:
                    problems.append(f'{where}: attention maps neither on the LR nor on the HR grid: {_some(bad)}')
                if ds.get('attention_meta'):
                    try:
                        check_attention_meta(att_path, dict(ds['attention_meta']))
                    except ValueError as err:
                        problems.append(f'{where}: {err}')
        state = 'OK' if len(problems) == before else f'{len(problems) - before} problem(s)'
        log(f'[check] {where} ({ds.get("name", "")}): {len(gt or {})} keys, {state}')
    return problems


# --------------------------------------------------------------------------- command line

def _attention_opts(pairs: Iterable[str]) -> Dict[str, dict]:
    """``['dino_resnet50.weights=/w.pth', ...]`` -> {source: {key: value}} (values as precompute parses them)."""
    from yoda_plugin.attention.precompute import parse_source_opts
    by_source: Dict[str, List[str]] = {}
    for pair in pairs or []:
        head, sep, _ = pair.partition('=')
        source, dot, key = head.partition('.')
        if not sep or not dot or not source or not key:
            raise UsageError(f'--attention-opt expects SOURCE.KEY=VALUE (e.g. dino_resnet50.weights=/path.pth), '
                             f'got {pair!r}')
        by_source.setdefault(source, []).append(pair[len(source) + 1:])
    try:
        return {source: parse_source_opts(items) for source, items in by_source.items()}
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_from_args(args) -> int:
    """Run a command line parsed by ``scripts/prepare_data.py``; the exit status (0, 1, 2)."""
    try:
        if args.check:
            problems = []
            for option_file in args.check:
                problems += check_layout(option_file, args.root)
            for p in problems:
                print(f'problem: {p}')
            print(f'[check] {len(args.check)} option file(s): ' +
                  ('layout OK' if not problems else f'{len(problems)} problem(s)'))
            return 1 if problems else 0
        if args.command is None:
            raise UsageError('give a command (faces or df2k) or --check OPTION_FILE')
        if args.workers < 1 or args.commit_every < 1 or (args.limit is not None and args.limit < 1):
            raise UsageError('--workers, --commit-every and --limit must be >= 1')
        if not 0 <= args.compress_level <= 9:
            raise UsageError('--compress-level must be in 0..9')
        opts = _attention_opts(args.attention_opt)
        if args.command == 'faces':
            plan = face_jobs(args.input, args.output, args.scenarios, args.val, args.name, args.limit,
                             args.compress_level, args.attention, opts)
        else:
            plan = df2k_jobs(args.train_hr or [], args.val_hr or [], args.output, args.limit, args.compress_level,
                             args.attention, opts)
        return run_plan(plan, args.workers, args.commit_every, args.device, args.attention_batch,
                        not args.no_progress)
    except (UsageError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (DiskFullError, lmdb.Error, OSError) as err:
        full = disk_full_error(err, getattr(err, 'path', None) or getattr(args, 'output', None) or '.')
        if full is None:
            raise
        print(f'error: {full}', file=sys.stderr)  # one line, no traceback; what was committed stays (rerun)
        return DISK_FULL_EXIT_CODE
