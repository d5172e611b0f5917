#!/usr/bin/env python
"""Precompute attention maps of LR images into a BasicSR-layout LMDB.

    python scripts/precompute_attention.py --input DIR_OR_LMDB --output OUT.lmdb --source edge \
        [--source-opt key=value ...] [--size H W | --scale S]

Input is an image folder (non-recursive, sorted; key = file stem) or a BasicSR
LMDB folder (keys from its meta_info.txt). Images are decoded as BasicSR's
loader does (``cv2.IMREAD_COLOR``: 3-channel 8-bit BGR, EXIF orientation
applied) and converted to RGB. Maps are computed on the image as given (the LR
image); ``--size`` or ``--scale`` resizes them (bilinear, clipped to [0, 1]),
e.g. onto the HR grid. The source configuration and the grid are recorded in
``yoda_attention.json`` of the output.

The run is resumable: keys already in the output are skipped (the output's
metadata must match this run's). Unreadable images are reported with their key
and the reason, and make the exit status 1; usage and setup errors give 2.
"""
import argparse
import json
import os
import sys
import time
from typing import Callable, List, Tuple

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import lmdb
import numpy as np
from tqdm import tqdm

from yoda_plugin.attention import ATTENTION_SOURCES, AttentionSource, build_attention_source
from yoda_plugin.data.attention_lmdb import (AttentionLMDBLockedError, AttentionLMDBWriter, make_attention_meta,
                                             read_meta_info, validate_key)

def load_attention_sources() -> None:
    """Import every module of ``yoda_plugin.attention`` so that all sources (DINO ones too) are registered.

    A module that fails to import is reported on stderr and skipped, so one broken
    optional source does not take the deterministic ones down with it.
    """
    import importlib
    import pkgutil

    import yoda_plugin.attention as package
    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f'{package.__name__}.{info.name}')
        except Exception as err:  # noqa: BLE001
            print(f'warning: attention sources of {package.__name__}.{info.name} unavailable: '
                  f'{type(err).__name__}: {err}', file=sys.stderr)


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm')

Item = Tuple[str, Callable[[], np.ndarray]]


class UsageError(ValueError):
    pass


# --------------------------------------------------------------------------- options

def parse_source_opts(pairs) -> dict:
    """``['k=v', ...]`` -> dict; values parsed as JSON (numbers, true/false/null), ``none`` -> None, else str."""
    opts = {}
    for pair in pairs or []:
        key, sep, text = pair.partition('=')
        key = key.strip()
        if not sep or not key:
            raise UsageError(f'--source-opt expects key=value, got {pair!r}')
        text = text.strip()
        if text.lower() in ('none', 'null'):
            value = None
        elif text.lower() in ('true', 'false'):
            value = text.lower() == 'true'
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = text
        if key in opts:
            raise UsageError(f'--source-opt {key} given twice')
        opts[key] = value
    return opts


def grid_meta(size=None, scale=None) -> dict:
    """Metadata fields describing the grid the maps are stored on."""
    if size is not None:
        return {'grid': 'fixed', 'size': [int(size[0]), int(size[1])], 'resize': 'bilinear'}
    if scale is not None:
        return {'grid': 'scaled', 'scale': float(scale), 'resize': 'bilinear'}
    return {'grid': 'lr'}


def output_size(shape, size=None, scale=None) -> Tuple[int, int]:
    h, w = shape[:2]
    if size is not None:
        return int(size[0]), int(size[1])
    if scale is not None:
        return max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    return h, w


def resize_map(amap: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) to (h, w), clipped to [0, 1]; unchanged when already that size."""
    if tuple(amap.shape[:2]) == tuple(hw):
        return amap
    out = cv2.resize(amap.astype(np.float32), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- inputs

def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 (H, W, 3), decoded like BasicSR (IMREAD_COLOR); ValueError if undecodable."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None:
        raise ValueError('cv2 cannot decode it (corrupt, truncated or not an image)')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def is_lmdb_folder(path: str) -> bool:
    return os.path.isdir(path) and (path.rstrip(os.sep).endswith('.lmdb') or
                                    os.path.isfile(os.path.join(path, 'data.mdb')))


def folder_items(folder: str) -> List[Item]:
    """(key, loader) for every image file of ``folder`` (non-recursive, sorted by name)."""
    names = sorted(n for n in os.listdir(folder)
                   if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n)))
    seen = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in seen:
            raise UsageError(f'{folder}: {seen[stem]} and {name} have the same key {stem!r}')
        seen[stem] = name

    def loader(path):
        def load():
            with open(path, 'rb') as f:
                return decode_image(f.read())
        return load

    return [(os.path.splitext(n)[0], loader(os.path.join(folder, n))) for n in names]


class LMDBImages:
    """Read-only access to a BasicSR image LMDB; items are (key, loader)."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, 'meta_info.txt')):
            raise UsageError(f'{path} has no meta_info.txt; a BasicSR LMDB lists its keys there')
        if not os.path.isfile(os.path.join(path, 'data.mdb')):
            raise UsageError(f'{path} has no data.mdb')
        self.path = path
        self.keys = [row[0] for row in read_meta_info(path)]
        self.env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)

    def items(self) -> List[Item]:
        def loader(key):
            def load():
                with self.env.begin(write=False) as txn:
                    value = txn.get(key.encode('utf-8'))
                    value = None if value is None else bytes(value)
                if value is None:
                    raise ValueError(f'listed in meta_info.txt but not in {self.path}')
                return decode_image(value)
            return load

        return [(k, loader(k)) for k in self.keys]

    def close(self):
        self.env.close()


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    load_attention_sources()
    p = argparse.ArgumentParser(description='Precompute YODA attention maps of LR images into a BasicSR-layout LMDB.')
    p.add_argument('--input', required=True, help='image folder or BasicSR LMDB folder (*.lmdb) of LR images')
    p.add_argument('--output', required=True, help='output LMDB folder (name.lmdb); an existing one is resumed')
    p.add_argument('--source', required=True, choices=sorted(ATTENTION_SOURCES), help='attention source')
    p.add_argument('--source-opt', action='append', default=[], metavar='KEY=VALUE',
                   help='source parameter (repeatable), e.g. --source-opt sigma=0.2')
    grid = p.add_mutually_exclusive_group()
    grid.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'), help='store maps resized to H x W')
    grid.add_argument('--scale', type=float, metavar='S', help='store maps resized by S (e.g. the SR scale: HR grid)')
    p.add_argument('--batch-size', type=int, default=1, help='images per source.batch() call (default 1)')
    p.add_argument('--compress-level', type=int, default=1, help='PNG compression level 0..9 (default 1)')
    p.add_argument('--map-size', type=int, default=1024 ** 3, help='initial LMDB map size in bytes (grows as needed)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _check_args(args, parser) -> None:
    if args.size is not None and (args.size[0] < 1 or args.size[1] < 1):
        parser.error(f'--size must be positive, got {args.size[0]} {args.size[1]}')
    if args.scale is not None and not (np.isfinite(args.scale) and args.scale > 0):
        parser.error(f'--scale must be a positive number, got {args.scale}')
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if not 0 <= args.compress_level <= 9:
        parser.error('--compress-level must be in 0..9')
    if not os.path.isdir(args.input):
        parser.error(f'--input {args.input} is not a folder')
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        parser.error('--output must differ from --input')


def compute_maps(source: AttentionSource, batch: List[Tuple[str, np.ndarray]]):
    """[(key, map or None, error or None)] for a batch; a failing batch is retried image by image."""
    try:
        maps = source.batch([img for _, img in batch])
        if len(maps) != len(batch):
            raise RuntimeError(f'source returned {len(maps)} maps for {len(batch)} images')
        return [(key, amap, None) for (key, _), amap in zip(batch, maps)]
    except Exception as err:  # noqa: BLE001  a bad image must not stop the run
        if len(batch) == 1:
            return [(batch[0][0], None, f'{type(err).__name__}: {err}')]
    results = []
    for key, img in batch:  # find the image(s) that fail
        try:
            results.append((key, source(img), None))
        except Exception as err:  # noqa: BLE001
            results.append((key, None, f'{type(err).__name__}: {err}'))
    return results


def run(args) -> int:
    opts = parse_source_opts(args.source_opt)
    source = build_attention_source(args.source, **opts)
    meta = make_attention_meta(source, **grid_meta(args.size, args.scale))

    lmdb_input = None
    if is_lmdb_folder(args.input):
        lmdb_input = LMDBImages(args.input)
        items = lmdb_input.items()
    else:
        items = folder_items(args.input)

    written = skipped = 0
    failed: List[Tuple[str, str]] = []
    start = time.perf_counter()
    try:
        with AttentionLMDBWriter(args.output, meta, map_size=args.map_size,
                                 compress_level=args.compress_level) as writer:
            pbar = tqdm(total=len(items), unit='img', disable=args.no_progress, desc=f'{args.source} attention')

            def fail(key, reason):
                failed.append((key, reason))
                tqdm.write(f'failed {key}: {reason}', file=sys.stdout)

            pending: List[Tuple[str, np.ndarray]] = []

            def flush():
                nonlocal written
                for key, amap, error in compute_maps(source, pending):
                    if error is None:
                        try:
                            writer.put(key, resize_map(np.asarray(amap), output_size(amap.shape, args.size,
                                                                                       args.scale)))
                            written += 1
                        except ValueError as err:
                            error = str(err)
                    if error is not None:
                        fail(key, error)
                pbar.update(len(pending))
                pending.clear()

            for key, load in items:
                try:
                    validate_key(key)
                except ValueError as err:
                    fail(key, str(err))
                    pbar.update(1)
                    continue
                if key in writer:
                    skipped += 1
                    pbar.update(1)
                    continue
                try:
                    image = load()
                except (OSError, ValueError) as err:
                    fail(key, str(err))
                    pbar.update(1)
                    continue
                pending.append((key, image))
                if len(pending) >= args.batch_size:
                    flush()
            if pending:
                flush()
            pbar.close()
    finally:
        if lmdb_input is not None:
            lmdb_input.close()

    seconds = time.perf_counter() - start
    print(f'{args.output}: written {written}, skipped {skipped} (already present), failed {len(failed)}, '
          f'{seconds:.1f} s')
    if failed:
        print(f'{len(failed)} image(s) failed:')
        for key, reason in failed:
            print(f'  {key}: {reason}')
        return 1
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    try:
        return run(args)
    except (UsageError, AttentionLMDBLockedError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
