"""Preparing image LMDBs: the library half of data preparation (the paper's recipes and the command line are
:mod:`yoda_plugin.apps.prepare_data`, whose ``scripts/prepare_data.py`` docstring is the user documentation).

Resizing
--------
* :func:`sr3_resize`: SR3's data preparation (Janspiry's ``data/prepare_data.py``): the short side is resized
  with Pillow's bicubic filter (aspect kept, the long side truncated to an int), then the centre square is cut.
* :func:`matlab_imresize`: MATLAB's bicubic ``imresize`` on uint8 data, rounded after each of the two passes, as
  MATLAB and SRDiff's port do (BasicSR's float ``imresize``, rounded once, differs by up to a few levels on ~10%
  of the pixels); :func:`mod_crop`; :func:`subimage_starts`: SRDiff's sub-image grid (step 320, a start is used
  while it lies more than 160 pixels before the far border; the last, shorter sub-image of a row or column is
  moved back inside the image, so every sub-image is 320x320).

Jobs
----
An :class:`ImageJob` turns input images into one or more image LMDBs (:class:`ImageTarget`), by ``kind``:
``faces`` (one :func:`sr3_resize` per target), ``df2k_train`` (HR/LR sub-images) or ``div2k_val`` (whole HR/LR,
cropped to a multiple of 4). :func:`run_image_job` makes or finishes them.

Resuming, idempotence and settings
----------------------------------
Each image LMDB gets ``yoda_prepare.json`` (its recipe: the settings that change its images) before any image.
Before anything is written, every target is checked: a folder holding an LMDB without a recipe is refused (it
is not ours); one with another recipe, or holding keys of images that are not among the job's inputs, is
refused with one line naming the differences and the choices (another output, or ``force``: archive it as
``<folder>_archived_<time>`` and make it afresh). Images are committed ``commit_every`` inputs at a time
(:func:`yoda_plugin.data.attention_lmdb.commit_pairs`, which grows the map), so an interrupted run keeps what it
committed; a rerun skips keys already present. When every input went in, ``yoda_prepare_complete.json``
records a fingerprint of the inputs (keys, file sizes, modification times) and the recipe: a rerun whose
fingerprint matches does nothing for that LMDB, not even reading image headers. Each LMDB folder is locked
while written (:class:`yoda_plugin.utils.filelock.FileLock`). :func:`check_layout` verifies the data an option
file reads and names an interrupted LMDB as incomplete.

Workers (``fork`` where available) decode, resize and PNG-encode; the main process alone writes.
"""
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import lmdb
import numpy as np

from ..utils.disk import raise_if_disk_full
from ..utils.filelock import FileLock, LockHeldError
from ..utils.fingerprint import SettingsMismatch, archive, differences, flatten
from .attention_lmdb import (META_FILE, META_INFO_FILE, _atomic_write_text, _png_size, check_attention_meta,
                             commit_pairs, read_meta_info, validate_key)
from .transforms import bicubic_resize

RECIPE_FILE = 'yoda_prepare.json'
COMPLETE_FILE = 'yoda_prepare_complete.json'
LOCK_FILE = 'yoda_prepare.lock'
FORMAT = 'yoda-prepare-v1'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm')

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


def refuse_output_inside_input(outputs: Sequence[str], inputs: Sequence[str]) -> None:
    for out in outputs:
        for inp in inputs:
            if _inside(out, inp):
                raise UsageError(f'the output {out} lies inside the input folder {inp}; write the LMDBs elsewhere '
                                 '(e.g. --output datasets next to the image folder)')


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


NEW_OUTPUT, FORCE = 'write to another --output', 'rerun with --force'


def target_problem(target: ImageTarget, kind: str = '', input_keys=None) -> Optional[Tuple[bool, str]]:
    """Why ``target`` cannot be written by a job of ``kind`` over the inputs ``input_keys`` (None: not checked),
    read-only (nothing is created): None when it can; else ``(archivable, message)``. Archivable: made by us with
    other settings (another recipe, or keys of other inputs), so ``force`` may archive it; not: an LMDB that
    prepare_data did not make."""
    recipe_file = os.path.join(target.path, RECIPE_FILE)
    if not os.path.exists(target.path):
        return None
    if not os.path.isdir(target.path):
        return False, f'{target.path} exists and is not a folder; move it away or choose another --output'
    found = read_json(recipe_file)
    if found is None and os.path.exists(recipe_file):
        return True, (f'{recipe_file} is unreadable; nothing was changed: {NEW_OUTPUT}, or {FORCE} to archive '
                      f'{target.path} and make it afresh')
    if found is None:
        if os.path.isfile(os.path.join(target.path, 'data.mdb')):
            return False, (f'{target.path} already holds an LMDB that prepare_data did not make (no {RECIPE_FILE}); '
                           'refusing to write into it: move it away or choose another --output')
        return None
    diffs = differences(flatten(found), flatten(target.recipe))
    if diffs:
        return True, str(SettingsMismatch('images', target.path, diffs, NEW_OUTPUT, FORCE))
    foreign = [] if input_keys is None else \
        sorted(k for k in lmdb_keys(target.path) if owner_key(kind, k) not in input_keys)
    if foreign:
        return True, (f'{target.path} holds {len(foreign)} key(s) of images that are not among this job\'s inputs, '
                      f'e.g. {foreign[:3]} (other input folder or a smaller --limit?); nothing was changed: '
                      f'{NEW_OUTPUT}, or {FORCE} to archive it and make it afresh')
    return None


def _archive_target(target: ImageTarget, log) -> str:
    """Archive ``target``'s folder (under its lock: no other run is writing it); the archive's path."""
    lock = _LockedFolder(target.path)
    try:
        moved = archive(target.path)
    finally:
        lock.release()
    try:
        os.remove(os.path.join(moved, LOCK_FILE))
    except FileNotFoundError:
        pass
    log(f'[prepare] --force: {target.path} was made with other settings; archived to {moved}')
    return moved


def _check_recipe(target: ImageTarget) -> None:
    """Under the folder's lock: refuse what :func:`target_problem` refuses; write the recipe into a new folder."""
    problem = target_problem(target)
    if problem is not None:
        raise UsageError(problem[1])
    if read_json(os.path.join(target.path, RECIPE_FILE)) is None:
        write_json(os.path.join(target.path, RECIPE_FILE), target.recipe)


# --------------------------------------------------------------------------- running an image job

def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=1.0, file=sys.stderr)


def run_image_job(job: ImageJob, workers: int = 2, commit_every: int = 16, show_progress: bool = True,
                  log=print, force: bool = False, archived: Optional[list] = None) -> Tuple[str, List[Tuple[str, str]]]:
    """Make (or finish) the LMDBs of ``job``; returns (what happened, [(path, reason) of failed inputs]).

    Every target is checked before anything is written (:func:`target_problem`): a refusal is a UsageError and
    leaves every folder as it was; with ``force`` a target made with other settings is archived instead (its
    path appended to ``archived``).
    """
    fp = fingerprint(job.kind, job.inputs, job.targets[0].recipe)
    markers = [read_json(os.path.join(t.path, COMPLETE_FILE)) for t in job.targets]
    if all(m is not None and m.get('fingerprint') == fp for m in markers):
        return f'complete already ({markers[0]["inputs"]} inputs), nothing to do', []

    input_keys = {item.key for item in job.inputs}
    stale = []
    for t in job.targets:
        problem = target_problem(t, job.kind, input_keys)
        if problem is not None:
            archivable, message = problem
            if not (force and archivable):
                raise UsageError(message)
            stale.append(t)
    for t in stale:
        _archive_target(t, log)
        if archived is not None:
            archived.append(t.path)
    locks = []
    try:
        for t in job.targets:
            locks.append(_LockedFolder(t.path))
            _check_recipe(t)
        existing = [set(lmdb_keys(t.path)) for t in job.targets]
        for t, keys in zip(job.targets, existing):  # another run may have written between the check and the lock
            foreign = sorted(k for k in keys if owner_key(job.kind, k) not in input_keys)
            if foreign:
                raise UsageError(f'{t.path} holds {len(foreign)} key(s) of images that are not among this job\'s '
                                 f'inputs, e.g. {foreign[:3]}; nothing was changed: {NEW_OUTPUT}, or {FORCE} to '
                                 'archive it and make it afresh')
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


# --------------------------------------------------------------------------- checking a layout

def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _lmdb_rows(path: str, what: str, problems: List[str]) -> Optional[Dict[str, Tuple[int, ...]]]:
    if not os.path.isdir(path):
        problems.append(f'{what}: {path} does not exist')
        return None
    ours = any(os.path.isfile(os.path.join(path, f)) for f in (RECIPE_FILE, META_FILE))
    if not os.path.isfile(os.path.join(path, 'data.mdb')) or not os.path.isfile(os.path.join(path, META_INFO_FILE)):
        if ours:  # made by prepare_data or precompute, which write meta_info.txt last: a run was interrupted
            problems.append(f'{what}: {path} is incomplete (an interrupted run): rerun the same command')
        else:
            problems.append(f'{what}: {path} is not a BasicSR LMDB (needs data.mdb and {META_INFO_FILE})')
        return None
    rows = {key: shape for key, shape, _ in read_meta_info(path)}
    stored = set(lmdb_keys(path))
    missing = sorted(set(rows) - stored)
    if missing:
        problems.append(f'{what}: {path}: {len(missing)} key(s) listed in {META_INFO_FILE} are not in data.mdb, '
                        f'e.g. {missing[:3]}')
    if os.path.isfile(os.path.join(path, RECIPE_FILE)) and not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
        problems.append(f'{what}: {path} is incomplete (no {COMPLETE_FILE}): rerun the same command')
    if not rows:
        problems.append(f'{what}: {path} lists no keys')
    return rows


def _some(keys, n=3) -> str:
    keys = sorted(keys)
    return f'{len(keys)} key(s), e.g. {keys[:n]}'


def check_layout(option_file: str, root: str = '.', log=print) -> List[str]:
    """Problems of the data an option file reads (paths relative to ``root``): LMDBs present and complete, LR/HR
    keys paired, HR = scale x LR for every key, LR not smaller than a training crop, an attention map for every
    key on the LR or HR grid, attention metadata matching ``attention_meta``. Prints one line per dataset.
    An option file that cannot be read, or has no mapping of datasets, is a UsageError naming it."""
    from yoda_plugin.utils.options import load_options
    try:
        opt = load_options(option_file)
    except ValueError as err:
        raise UsageError(' '.join(str(err).split())) from None
    scale = opt.get('scale')
    problems: List[str] = []
    datasets = opt.get('datasets') or {}
    if not isinstance(datasets, dict) or not all(isinstance(ds, dict) for ds in datasets.values()):
        raise UsageError(f'option file {option_file}: datasets must be a mapping of dataset sections')
    for phase, ds in datasets.items():
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


