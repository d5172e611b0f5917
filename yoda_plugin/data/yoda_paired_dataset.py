"""Paired LR/HR images plus the LR image's attention map, for YODA training.

Attention maps are precomputed into a BasicSR-layout LMDB (see
``scripts/precompute_attention.py``) whose keys are the image keys. A map is
stored on the LR grid (or the HR grid) and returned on the HR grid, where SR3
diffuses (the mask has the size of the upsampled LR input). A missing or
mis-sized map is an error naming the key; it is never replaced silently.
"""
import os
import random

import numpy as np
import torch
from basicsr.utils import imfrombytes, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from .attention_lmdb import check_attention_meta, decode_attention, read_meta_info_keys
from .lmdb_reader import lmdb_get
from .transforms import RESIZE_MODES, augment_same, bicubic_resize, resize_attention

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')

# Keys BasicSR's data pipeline reads or adds; everything else must be ours.
BASICSR_DATASET_KEYS = {
    'name', 'type', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'use_shuffle',
    'dataset_enlarge_ratio', 'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers'
}
YODA_DATASET_KEYS = {
    'dataroot_gt', 'dataroot_lq', 'dataroot_attention', 'io_backend', 'gt_size', 'use_hflip', 'use_rot',
    'resize', 'filename_tmpl', 'attention_meta', 'attention_required', 'meta_info_file'
}


def _lmdb_keys(folder: str, what: str) -> list:
    meta = os.path.join(folder, 'meta_info.txt')
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{what}: LMDB folder {folder} does not exist')
    if not os.path.isfile(meta):
        raise FileNotFoundError(f'{what}: {folder} has no meta_info.txt; a BasicSR-layout LMDB lists its keys '
                                'there (one "<key>.png (h,w,c) compress" line per image)')
    keys = read_meta_info_keys(meta)
    if not keys:
        raise ValueError(f'{what}: {meta} lists no keys')
    return keys


def _folder_files(folder: str, what: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{what}: image folder {folder} does not exist')
    files = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMG_EXTENSIONS and os.path.isfile(os.path.join(folder, name)):  # not a folder "x.png"
            files[stem] = os.path.join(folder, name)
    if not files:
        raise ValueError(f'{what}: no images ({", ".join(IMG_EXTENSIONS)}) in {folder}')
    return files


def _meta_info_keys(path: str, what: str) -> list:
    """Keys listed in a BasicSR ``meta_info_file``: the first field of each line, without its extension."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what}: meta_info_file {path} does not exist')
    keys = [os.path.basename(key) for key in read_meta_info_keys(path)]  # BasicSR's lists may hold folders
    if not keys:
        raise ValueError(f'{what}: meta_info_file {path} lists no keys')
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f'{what}: meta_info_file {path} lists key(s) more than once: {repeated[:5]}')
    return keys


def _describe_mismatch(a: set, b: set, name_a: str, name_b: str) -> str:
    only_a, only_b = sorted(a - b), sorted(b - a)
    parts = []
    if only_a:
        parts.append(f'{len(only_a)} key(s) only in {name_a}, e.g. {only_a[:5]}')
    if only_b:
        parts.append(f'{len(only_b)} key(s) only in {name_b}, e.g. {only_b[:5]}')
    return '; '.join(parts)


@DATASET_REGISTRY.register()
class YODAPairedDataset(data.Dataset):
    """LR, bicubic-upsampled LR, HR and attention map per key.

    Options (``datasets.<phase>``):
        dataroot_gt: HR images, an image folder or a BasicSR LMDB (with io_backend lmdb).
        dataroot_lq: LR images (optional). Without it, LR = bicubic(HR) (``resize``).
        dataroot_attention: attention LMDB from scripts/precompute_attention.py.
        attention_required: need a map for every key (default: true when
            dataroot_attention is set). Models with YODA on refuse batches without.
        attention_meta: mapping the LMDB's ``yoda_attention.json`` must match
            (e.g. ``{source: {name: edge}}``); a mismatch is an error.
        io_backend: ``{type: disk}`` or ``{type: lmdb}`` (LR and HR); the
            attention LMDB is always read as LMDB.
        scale: set by BasicSR from the top-level ``scale``.
        gt_size: HR crop size for training (null: whole images).
        use_hflip / use_rot: random flips / rotations, identical for LR, HR and map.
        resize: ``pil`` (default, SR3's data: Pillow bicubic) or ``matlab``.
        filename_tmpl: LR file name template in folder mode (default ``{}``).
        meta_info_file: a BasicSR meta info file; only the keys it lists (first field of each line, extension
            dropped, e.g. ``0001.png (480,480,3) 1``) are used, in its order; every one must be in dataroot_gt.

    Returns ``lq`` (LR), ``lq_up`` (LR bicubic-upsampled to HR size), ``gt``,
    all RGB float in [0, 1] (3, H, W); ``attention`` (1, H_gt, W_gt) in [0, 1]
    when available; ``key``, ``lq_path``, ``gt_path``.
    """

    def __init__(self, opt):
        super().__init__()
        unknown = sorted(set(opt) - BASICSR_DATASET_KEYS - YODA_DATASET_KEYS)
        where = f'datasets.{opt.get("phase", "?")} ({opt.get("name", "unnamed")})'
        if unknown:
            raise ValueError(f'{where}: unknown option(s) {unknown}; known YODA dataset options: '
                             f'{sorted(YODA_DATASET_KEYS)}')
        self.opt = opt
        self.where = where
        if 'dataroot_gt' not in opt:
            raise ValueError(f'{where}: dataroot_gt is required')
        self.scale = opt.get('scale')
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f'{where}: scale must be a positive integer (top-level "scale"), got {self.scale!r}')
        self.resize = opt.get('resize', 'pil')
        if self.resize not in RESIZE_MODES:
            raise ValueError(f'{where}.resize must be one of {RESIZE_MODES}, got {self.resize!r}')
        self.gt_size = opt.get('gt_size')
        if self.gt_size is not None and (self.gt_size % self.scale):
            raise ValueError(f'{where}: gt_size {self.gt_size} is not a multiple of scale {self.scale}')
        self.io_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.backend = self.io_opt.get('type', 'disk')
        if self.backend not in ('disk', 'lmdb'):
            raise ValueError(f'{where}.io_backend.type must be disk or lmdb, got {self.backend!r}')
        self.gt_folder, self.lq_folder = opt['dataroot_gt'], opt.get('dataroot_lq')
        self.att_folder = opt.get('dataroot_attention')
        self.attention_required = bool(opt.get('attention_required', self.att_folder is not None))
        if self.attention_required and self.att_folder is None:
            raise ValueError(f'{where}: attention_required is true but dataroot_attention is not set')

        if self.backend == 'lmdb':
            self.keys = _lmdb_keys(self.gt_folder, f'{where}.dataroot_gt')
            if self.lq_folder is not None:
                lq_keys = _lmdb_keys(self.lq_folder, f'{where}.dataroot_lq')
                if set(lq_keys) != set(self.keys):
                    raise ValueError(f'{where}: LR and HR LMDB keys differ: ' +
                                     _describe_mismatch(set(self.keys), set(lq_keys), self.gt_folder, self.lq_folder))
            self.gt_paths = {k: k for k in self.keys}
            self.lq_paths = {k: k for k in self.keys} if self.lq_folder else {}
        else:
            self.gt_paths = _folder_files(self.gt_folder, f'{where}.dataroot_gt')
            self.keys = sorted(self.gt_paths)
            self.lq_paths = {}
            if self.lq_folder is not None:
                tmpl = opt.get('filename_tmpl', '{}')
                lq_files = _folder_files(self.lq_folder, f'{where}.dataroot_lq')
                expected = {tmpl.format(k): k for k in self.keys}
                if set(expected) != set(lq_files):
                    raise ValueError(f'{where}: LR and HR images do not pair up: ' +
                                     _describe_mismatch(set(expected), set(lq_files), 'the HR keys (via filename_tmpl)',
                                                        self.lq_folder))
                self.lq_paths = {k: lq_files[n] for n, k in expected.items()}

        if opt.get('meta_info_file'):  # BasicSR's key: train on the subset of keys listed in this file
            listed = _meta_info_keys(opt['meta_info_file'], f'{where}.meta_info_file')
            known = set(self.keys)
            missing = [k for k in listed if k not in known]
            if missing:
                raise KeyError(f'{where}: meta_info_file {opt["meta_info_file"]} lists {len(missing)} key(s) that '
                               f'{self.gt_folder} does not hold, e.g. {missing[:5]}')
            self.keys = listed
            self.gt_paths = {k: self.gt_paths[k] for k in listed}
            self.lq_paths = {k: self.lq_paths[k] for k in listed if k in self.lq_paths}

        if self.att_folder is not None:
            att_keys = set(_lmdb_keys(self.att_folder, f'{where}.dataroot_attention'))
            missing = sorted(set(self.keys) - att_keys)
            if missing and self.attention_required:
                raise KeyError(f'{where}: attention LMDB {self.att_folder} has no map for {len(missing)} image key(s), '
                               f'e.g. {missing[:5]}; precompute them with scripts/precompute_attention.py')
            if opt.get('attention_meta'):
                check_attention_meta(self.att_folder, dict(opt['attention_meta']))

    def __len__(self):
        return len(self.keys)

    def _read_image(self, key: str, which: str) -> np.ndarray:
        """RGB uint8 image of ``key`` from the HR (``gt``) or LR (``lq``) source."""
        folder = self.gt_folder if which == 'gt' else self.lq_folder
        if self.backend == 'lmdb':
            value, where = lmdb_get(folder, key), f'key {key!r} of LMDB {folder}'
            if value is None:
                raise KeyError(f'{self.where}: {where} not found')
        else:
            path = (self.gt_paths if which == 'gt' else self.lq_paths)[key]
            where = path
            with open(path, 'rb') as f:
                value = f.read()
        try:
            img = imfrombytes(value, float32=False)
        except Exception as err:  # cv2 gives little context: add the file
            raise ValueError(f'{self.where}: cannot decode {which} image {where}: {err}') from err
        if img is None:
            raise ValueError(f'{self.where}: cannot decode {which} image {where} (unreadable or truncated)')
        return img[:, :, ::-1]  # BGR (cv2) -> RGB, uint8; gray and RGBA are read as 3-channel

    def _read_attention(self, key: str):
        value = lmdb_get(self.att_folder, key)
        if value is None:
            if self.attention_required:
                raise KeyError(f'{self.where}: no attention map for key {key!r} in {self.att_folder}')
            return None
        return decode_attention(value, key)

    def __getitem__(self, index):
        key = self.keys[index]
        scale = self.scale
        gt = self._read_image(key, 'gt')
        if self.lq_folder is not None:
            lq = self._read_image(key, 'lq')
            if (lq.shape[0] * scale, lq.shape[1] * scale) != gt.shape[:2]:
                raise ValueError(f'{self.where}: key {key!r}: LR size {lq.shape[:2]} x scale {scale} does not match '
                                 f'HR size {gt.shape[:2]}')
        else:
            h, w = gt.shape[0] - gt.shape[0] % scale, gt.shape[1] - gt.shape[1] % scale
            gt = gt[:h, :w]
            lq = bicubic_resize(gt, (h // scale, w // scale), self.resize)

        att = None
        if self.att_folder is not None:
            att = self._read_attention(key)
        if att is not None:
            if att.shape not in (lq.shape[:2], gt.shape[:2]):
                raise ValueError(f'{self.where}: attention map for key {key!r} has size {att.shape}, expected the LR '
                                 f'size {lq.shape[:2]} or the HR size {gt.shape[:2]}')
            att = resize_attention(att, gt.shape[:2])[:, :, None]

        if self.gt_size is not None:
            lq_size = self.gt_size // scale
            if lq.shape[0] < lq_size or lq.shape[1] < lq_size:
                raise ValueError(f'{self.where}: key {key!r}: LR image {lq.shape[:2]} is smaller than the crop '
                                 f'{lq_size} (gt_size {self.gt_size} / scale {scale})')
            top = random.randint(0, lq.shape[0] - lq_size)
            left = random.randint(0, lq.shape[1] - lq_size)
            lq = lq[top:top + lq_size, left:left + lq_size]
            sl = (slice(top * scale, (top + lq_size) * scale), slice(left * scale, (left + lq_size) * scale))
            gt = gt[sl]
            att = att[sl] if att is not None else None

        if self.opt.get('phase') == 'train' and (self.opt.get('use_hflip') or self.opt.get('use_rot')):
            arrays = [gt, lq] + ([att] if att is not None else [])
            arrays = augment_same(arrays, bool(self.opt.get('use_hflip')), bool(self.opt.get('use_rot')))
            gt, lq = arrays[0], arrays[1]
            att = arrays[2] if att is not None else None

        lq_up = bicubic_resize(np.ascontiguousarray(lq), gt.shape[:2], self.resize)
        gt_t, lq_t, up_t = img2tensor([np.ascontiguousarray(a).astype(np.float32) / 255.0 for a in (gt, lq, lq_up)],
                                      bgr2rgb=False, float32=True)
        out = {'gt': gt_t, 'lq': lq_t, 'lq_up': up_t, 'key': key, 'gt_path': str(self.gt_paths[key]),
               'lq_path': str(self.lq_paths.get(key, self.gt_paths[key]))}
        if att is not None:
            out['attention'] = torch.from_numpy(np.ascontiguousarray(att.transpose(2, 0, 1))).float()
        return out
