#!/usr/bin/env python
"""Precompute attention maps of LR images into a BasicSR-layout LMDB.

    python scripts/precompute_attention.py --input DIR_OR_LMDB --output OUT.lmdb --source edge \
        [--source-opt key=value ...] [--size H W | --scale S] [--device cuda|cpu] [--batch-size N] \
        [--previews DIR [--preview-count N]]
    torchrun --nproc_per_node=4 scripts/precompute_attention.py ...        # sharded, same arguments

Input is an image folder (non-recursive, sorted; key = file stem) or a BasicSR
LMDB folder (keys from its meta_info.txt). Images are decoded as BasicSR's
loader does (``cv2.IMREAD_COLOR``: 3-channel 8-bit BGR, EXIF orientation
applied) and converted to RGB. Maps are computed on the image as given (the LR
image); ``--size`` or ``--scale`` resizes them (bilinear, clipped to [0, 1]),
e.g. onto the HR grid. The source configuration and the grid are recorded in
``yoda_attention.json`` of the output. ``--device`` (default ``cuda`` when
available, else ``cpu``) is passed to sources that take one (DINO); the
deterministic ones run on the CPU and ignore it.

The run is resumable: keys already in the output are skipped (the output's
metadata must match this run's); maps are committed ``--commit-every`` at a
time (default 64), so an interruption loses at most that many; the LMDB map
grows as needed. Unreadable
images are reported with their key and the reason, and make the exit status 1;
usage and setup errors (bad options, another writer holding the output,
metadata of another configuration, missing weights) give 2.

Sharding: under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` of ``W`` handles
keys ``r, r + W, ...`` of the sorted input and writes them into its own shard
``<output>.shards/rank<r>.lmdb`` (same metadata, resumable per shard; keys
already in ``<output>`` are skipped). The ranks talk over ``torch.distributed``
(gloo, initialised from torchrun's environment): when all have finished, rank
0 merges every shard folder found there into ``<output>`` (keys already there
are kept, so an interrupted merge just resumes), rewrites meta_info.txt and
removes the shards. A plain (single-process) run on an output with leftover
shards merges them first, so an interrupted sharded run can be finished with or
without torchrun. Every rank exits with the same status: 1 when an image
failed on any rank (failure counts are all-reduced), 2 for a setup error on any
rank; torchrun itself exits 1 whenever a worker exits non-zero.

Previews (``--previews DIR``): for the first ``--preview-count`` keys (default
8) a PNG strip ``DIR/<key>.png``: the LR image, each head map (DINO sources;
deterministic sources have just the one map) and the stored aggregated map
(MAX/AVG), colour-mapped with viridis, every tile resized to 128 px height
(nearest neighbour when enlarging, so LR pixels stay visible) and labelled, as
in the paper's Fig. 3.
"""
import argparse
import datetime
import inspect
import json
import os
import re
import shutil
import sys
import time
from typing import Callable, List, Optional, Sequence, Set, Tuple

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import lmdb
import numpy as np
import torch
from tqdm import tqdm

from yoda_plugin.attention import ATTENTION_SOURCES, AttentionSource, build_attention_source
from yoda_plugin.data.attention_lmdb import (AttentionLMDBLockedError, AttentionLMDBWriter, encode_attention,
                                             make_attention_meta, read_meta_info, validate_key)


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


# --------------------------------------------------------------------------- device and source

SETUP_ERRORS = (UsageError, AttentionLMDBLockedError, ValueError, FileNotFoundError)


def resolve_device(requested: Optional[str], local_rank: Optional[int] = None) -> torch.device:
    """``--device`` -> torch.device: default cuda when available, else cpu; under torchrun a bare ``cuda`` becomes
    ``cuda:<LOCAL_RANK>`` (modulo the visible GPUs)."""
    if requested is None:
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f'--device {requested!r} is not a torch device: {err}') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {requested}: CUDA is not available on this machine (use --device cpu)')
        if device.index is None and local_rank is not None:
            device = torch.device('cuda', local_rank % torch.cuda.device_count())
    return device


def source_takes_device(name: str) -> bool:
    cls = ATTENTION_SOURCES[name]
    return 'device' in inspect.signature(cls.__init__).parameters


def build_source(args, local_rank: Optional[int] = None) -> AttentionSource:
    """The attention source of ``args``; ``--device`` goes to sources whose constructor takes ``device``."""
    opts = parse_source_opts(args.source_opt)
    if source_takes_device(args.source):
        if 'device' in opts:
            if args.device is not None and str(opts['device']) != args.device:
                raise UsageError(f'--device {args.device} and --source-opt device={opts["device"]} disagree')
            opts['device'] = str(resolve_device(str(opts['device']), local_rank))
        else:
            opts['device'] = str(resolve_device(args.device, local_rank))
    elif args.device is not None:
        try:  # still reject a nonsense --device; the source itself runs on the CPU and ignores it
            torch.device(args.device)
        except (RuntimeError, TypeError) as err:
            raise UsageError(f'--device {args.device!r} is not a torch device: {err}') from None
    return build_attention_source(args.source, **opts)


def load_items(args):
    """(items, closable LMDB input or None)."""
    if is_lmdb_folder(args.input):
        lmdb_input = LMDBImages(args.input)
        return lmdb_input.items(), lmdb_input
    return folder_items(args.input), None


# --------------------------------------------------------------------------- previews

PREVIEW_HEIGHT = 128


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Small white text with a black outline in the top-left corner (in place)."""
    scale = 0.4 if tile.shape[0] >= 64 else 0.3
    org = (3, int(round(12 * scale / 0.4)) + 1)
    cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _fit_height(tile: np.ndarray, height: int) -> np.ndarray:
    h, w = tile.shape[:2]
    width = max(1, int(round(w * height / h)))
    if (h, w) == (height, width):
        return tile.copy()
    interpolation = cv2.INTER_NEAREST if height >= h else cv2.INTER_AREA
    return cv2.resize(tile, (width, height), interpolation=interpolation)


def colorize(amap: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> BGR uint8 with OpenCV's viridis colour map (low: blue/purple, high: yellow)."""
    u8 = np.round(np.clip(np.asarray(amap, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_VIRIDIS)


def preview_tiles(source: AttentionSource, image: np.ndarray) -> List[Tuple[str, np.ndarray]]:
    """[(label, map)]: every head map (sources with ``head_maps``) and the map the LMDB stores, last."""
    tiles = []
    if hasattr(source, 'batch_head_maps'):
        from yoda_plugin.attention.dino import aggregate_heads
        heads = source.batch_head_maps([image])[0]
        tiles += [(f'head {k}', heads[k]) for k in range(heads.shape[0])]
        mode = source.heads
        label = mode.upper() if isinstance(mode, str) else f'used: head {mode}'
        tiles.append((label, aggregate_heads(heads, mode)))
    else:
        tiles.append((source.name, source(image)))
    return tiles


def preview_strip(image: np.ndarray, tiles: Sequence[Tuple[str, np.ndarray]], height: int = PREVIEW_HEIGHT):
    """BGR uint8 strip: the RGB image, then every (label, map) colour-mapped; each tile ``height`` px high."""
    parts = [_label(_fit_height(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), height), 'LR')]
    parts += [_label(_fit_height(colorize(amap), height), label) for label, amap in tiles]
    return np.concatenate(parts, axis=1)


def preview_name(key: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]', '_', key) + '.png'


def write_previews(source: AttentionSource, items: Sequence[Item], folder: str, log=print) -> int:
    """Write a preview strip per item into ``folder``; unreadable images are only reported (the main pass counts
    them). Returns the number written."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    for key, load in items:
        try:
            image = load()
            strip = preview_strip(image, preview_tiles(source, image))
            path = os.path.join(folder, preview_name(key))
            if not cv2.imwrite(path, strip):
                raise OSError(f'cv2 cannot write {path}')
            written += 1
        except Exception as err:  # noqa: BLE001  previews never stop the run
            log(f'preview of {key} skipped: {type(err).__name__}: {err}')
    return written


# --------------------------------------------------------------------------- computing

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


def process_items(source: AttentionSource, items: Sequence[Item], writer: AttentionLMDBWriter, args,
                  done: Set[str] = frozenset(), desc: str = '', show_progress: bool = True, prefix: str = ''):
    """Compute and store the maps of ``items`` not yet in ``writer`` (nor in ``done``).

    Returns (written, skipped, failed) with failed = [(key, reason)].
    """
    written = skipped = 0
    failed: List[Tuple[str, str]] = []
    pbar = tqdm(total=len(items), unit='img', disable=args.no_progress or not show_progress, desc=desc)
    out = BufferedWriter(writer, getattr(args, 'commit_every', 1))

    def fail(key, reason):
        failed.append((key, reason))
        tqdm.write(f'{prefix}failed {key}: {reason}', file=sys.stdout)

    pending: List[Tuple[str, np.ndarray]] = []

    def flush():
        nonlocal written
        for key, amap, error in compute_maps(source, pending):
            if error is None:
                try:
                    out.add(key, resize_map(np.asarray(amap), output_size(amap.shape, args.size, args.scale)))
                    written += 1
                except ValueError as err:
                    error = str(err)
            if error is not None:
                fail(key, error)
        pbar.update(len(pending))
        pending.clear()

    try:
        for key, load in items:
            try:
                validate_key(key)
            except ValueError as err:
                fail(key, str(err))
                pbar.update(1)
                continue
            if key in done or key in writer:
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
    finally:
        out.flush()  # also when interrupted: keep every map computed so far
        pbar.close()
    return written, skipped, failed


# --------------------------------------------------------------------------- shards

_SHARD_NAME = re.compile(r'^rank(\d+)\.lmdb$')


def shard_root(output: str) -> str:
    """``<output>.shards``: the folder holding the per-rank shard LMDBs of a sharded run."""
    return os.path.normpath(os.path.abspath(output)) + '.shards'


def shard_path(output: str, rank: int) -> str:
    return os.path.join(shard_root(output), f'rank{rank}.lmdb')


def shard_folders(output: str) -> List[str]:
    """Shard LMDB folders (``rank<r>.lmdb``) present under ``<output>.shards``, by rank."""
    root = shard_root(output)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) for m in [_SHARD_NAME.match(name)]
             if m and os.path.isdir(os.path.join(root, name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def commit_encoded(writer: AttentionLMDBWriter, pairs: Sequence[Tuple[bytes, bytes]], overwrite: bool = True) -> int:
    """Put encoded ``(key, value)`` pairs into ``writer``'s LMDB in **one** transaction; grow the map when full.

    ``AttentionLMDBWriter.put`` commits (and fsyncs) every map on its own, which costs milliseconds per map on
    most disks, more than computing a deterministic map; one transaction per chunk keeps the same guarantees
    (readers never see a torn value, an interrupted run keeps every committed chunk) at a fraction of the cost.
    With ``overwrite=False`` keys already present are kept. Returns how many keys were new.
    """
    env = writer.env
    if env is None:
        raise RuntimeError(f'attention LMDB writer for {writer.path} is closed')
    for _ in range(64):
        try:
            added = 0
            with env.begin(write=True) as txn:
                for key, value in pairs:
                    added += bool(txn.put(key, value, overwrite=overwrite))
            return added
        except lmdb.MapFullError:  # the transaction was aborted; grow and retry the whole chunk
            need = sum(len(v) for _, v in pairs)
            writer.map_size = max(2 * writer.map_size, writer.map_size + 4 * need)
            env.set_mapsize(writer.map_size)
            writer.map_size = int(env.info()['map_size'])
    raise RuntimeError(f'cannot fit {len(pairs)} values into {writer.path} after growing the map')


class BufferedWriter:
    """Encodes maps at once (invalid maps raise ValueError naming the key in :meth:`add`) and commits them to
    the writer ``every`` maps at a time (and on :meth:`flush`)."""

    def __init__(self, writer: AttentionLMDBWriter, every: int = 64):
        self.writer, self.every = writer, max(1, int(every))
        self.pending: List[Tuple[bytes, bytes]] = []

    def add(self, key: str, amap) -> None:
        raw = validate_key(key)
        self.pending.append((raw, encode_attention(amap, key, self.writer.compress_level)))
        if len(self.pending) >= self.every:
            self.flush()

    def __contains__(self, key: str) -> bool:
        return key in self.writer

    def flush(self) -> None:
        if self.pending:
            commit_encoded(self.writer, self.pending)
            self.pending = []


def merge_shards(writer: AttentionLMDBWriter, output: str, chunk: int = 1000, log=print) -> Tuple[int, int, int]:
    """Merge every shard folder of ``output`` into the open final ``writer``, then delete the shards.

    Each shard is opened with its own :class:`AttentionLMDBWriter`: that takes its lock (no run is still writing
    it) and refuses a shard whose metadata differs from the output's (ValueError). Keys already in the output
    are kept and the shard's copy dropped; values are committed ``chunk`` keys per transaction, so an
    interrupted merge keeps what it committed and a rerun completes it. A shard folder is deleted only after
    all its keys are committed; ``<output>.shards`` is removed when it is empty.
    Returns (shards merged, keys added, keys already present).
    """
    added = present = merged = 0
    for path in shard_folders(output):
        with AttentionLMDBWriter(path, writer.meta, compress_level=writer.compress_level) as shard:
            with shard.env.begin(write=False) as txn:
                pairs: List[Tuple[bytes, bytes]] = []
                for key, value in txn.cursor():
                    pairs.append((bytes(key), bytes(value)))
                    if len(pairs) >= chunk:
                        new = commit_encoded(writer, pairs, overwrite=False)
                        added, present, pairs = added + new, present + len(pairs) - new, []
                if pairs:
                    new = commit_encoded(writer, pairs, overwrite=False)
                    added, present = added + new, present + len(pairs) - new
        writer.env.sync(True)
        shutil.rmtree(path)
        merged += 1
    root = shard_root(output)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    if merged:
        log(f'{output}: merged {merged} shard(s): {added} key(s) added, {present} already present')
    return merged, added, present


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    load_attention_sources()
    p = argparse.ArgumentParser(description='Precompute YODA attention maps of LR images into a BasicSR-layout LMDB. '
                                'Run it under torchrun to shard the work over processes.')
    p.add_argument('--input', required=True, help='image folder or BasicSR LMDB folder (*.lmdb) of LR images')
    p.add_argument('--output', required=True, help='output LMDB folder (name.lmdb); an existing one is resumed')
    p.add_argument('--source', required=True, choices=sorted(ATTENTION_SOURCES), help='attention source')
    p.add_argument('--source-opt', action='append', default=[], metavar='KEY=VALUE',
                   help='source parameter (repeatable), e.g. --source-opt sigma=0.2')
    grid = p.add_mutually_exclusive_group()
    grid.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'), help='store maps resized to H x W')
    grid.add_argument('--scale', type=float, metavar='S', help='store maps resized by S (e.g. the SR scale: HR grid)')
    p.add_argument('--device', default=None,
                   help='torch device for sources that take one (DINO): default cuda if available, else cpu; '
                   'under torchrun "cuda" means cuda:<LOCAL_RANK>. Deterministic sources ignore it')
    p.add_argument('--batch-size', type=int, default=1, help='images per source.batch() call (default 1)')
    p.add_argument('--compress-level', type=int, default=1, help='PNG compression level 0..9 (default 1)')
    p.add_argument('--map-size', type=int, default=1024 ** 3, help='initial LMDB map size in bytes (grows as needed)')
    p.add_argument('--commit-every', type=int, default=64, metavar='N',
                   help='maps per LMDB transaction (default 64; an interrupted run recomputes at most N-1 maps). '
                   '1 commits every map on its own, several ms each on most disks')
    p.add_argument('--previews', metavar='DIR', default=None,
                   help='write a preview strip (LR | heads | aggregated map) per image of the first keys to DIR')
    p.add_argument('--preview-count', type=int, default=8, metavar='N', help='keys with a preview (default 8)')
    p.add_argument('--dist-timeout', type=float, default=24 * 60.0, metavar='MIN',
                   help='torchrun only: minutes a rank waits for the others (default 1440)')
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
    if args.commit_every < 1:
        parser.error('--commit-every must be >= 1')
    if args.preview_count < 0:
        parser.error('--preview-count must be >= 0')
    if not args.dist_timeout > 0:
        parser.error('--dist-timeout must be positive')
    if not os.path.isdir(args.input):
        parser.error(f'--input {args.input} is not a folder')
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        parser.error('--output must differ from --input')


def _summary(output, written, skipped, failed, seconds) -> int:
    print(f'{output}: written {written}, skipped {skipped} (already present), failed {len(failed)}, '
          f'{seconds:.1f} s')
    if failed:
        print(f'{len(failed)} image(s) failed:')
        for key, reason in failed:
            print(f'  {key}: {reason}')
        return 1
    return 0


def run(args) -> int:
    """Single process: leftover shards of an interrupted sharded run are merged first, then maps are computed
    straight into ``--output``."""
    source = build_source(args)
    meta = make_attention_meta(source, **grid_meta(args.size, args.scale))
    items, lmdb_input = load_items(args)
    start = time.perf_counter()
    try:
        with AttentionLMDBWriter(args.output, meta, map_size=args.map_size,
                                 compress_level=args.compress_level) as writer:
            merge_shards(writer, args.output)
            if args.previews and args.preview_count:
                n = write_previews(source, items[:args.preview_count], args.previews)
                print(f'previews: {n} written to {args.previews}')
            written, skipped, failed = process_items(source, items, writer, args, desc=f'{args.source} attention')
    finally:
        if lmdb_input is not None:
            lmdb_input.close()
    return _summary(args.output, written, skipped, failed, time.perf_counter() - start)


def _all_max(value: int) -> int:
    import torch.distributed as dist
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_distributed(args, rank: int, world: int, local_rank: int) -> int:
    """One rank of a torchrun job (see the module docstring). Every rank returns the same exit status."""
    import torch.distributed as dist
    dist.init_process_group('gloo', timeout=datetime.timedelta(minutes=args.dist_timeout))
    final = shard = lmdb_input = None
    prefix = f'[rank {rank}] '
    try:
        # 1. setup: rank 0 opens (creates, checks, locks) the final output; errors on any rank stop all with 2
        status, done = 0, set()
        try:
            source = build_source(args, local_rank)
            meta = make_attention_meta(source, **grid_meta(args.size, args.scale))
            items, lmdb_input = load_items(args)
            if rank == 0:
                final = AttentionLMDBWriter(args.output, meta, map_size=args.map_size,
                                            compress_level=args.compress_level)
                done = set(final.keys())
        except SETUP_ERRORS as err:
            print(f'{prefix}error: {err}', file=sys.stderr)
            status = 2
        if _all_max(status):
            return 2
        box = [sorted(done)]
        dist.broadcast_object_list(box, src=0)
        done = set(box[0])
        try:
            shard = AttentionLMDBWriter(shard_path(args.output, rank), meta, map_size=args.map_size,
                                        compress_level=args.compress_level)
        except SETUP_ERRORS as err:
            print(f'{prefix}error: {err}', file=sys.stderr)
            status = 2
        if _all_max(status):
            return 2

        # 2. compute this rank's share into its shard
        start = time.perf_counter()
        if rank == 0 and args.previews and args.preview_count:
            n = write_previews(source, items[:args.preview_count], args.previews)
            print(f'previews: {n} written to {args.previews}')
        mine = items[rank::world]
        written, skipped, failed = process_items(
            source, mine, shard, args, done=done, desc=f'{args.source} attention (rank 0 of {world})',
            show_progress=rank == 0, prefix=prefix)
        shard.close()
        shard = None
        stats = [None] * world
        dist.all_gather_object(stats, (written, skipped, failed))  # waits for every rank

        # 3. rank 0 merges all shards into the output; the status is shared with every rank
        code = 0
        if rank == 0:
            written = sum(s[0] for s in stats)
            skipped = sum(s[1] for s in stats)
            failed = [f for s in stats for f in s[2]]
            try:
                merge_shards(final, args.output)
                final.close()
                code = _summary(args.output, written, skipped, failed, time.perf_counter() - start)
            except SETUP_ERRORS as err:
                print(f'error: merging the shards into {args.output} failed: {err}', file=sys.stderr)
                code = 2
        box = [code]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])
    finally:
        for writer in (shard, final):
            if writer is not None:
                writer.close()
        if lmdb_input is not None:
            lmdb_input.close()
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    try:
        if world > 1:
            rank = int(os.environ.get('RANK', '0'))
            return run_distributed(args, rank, world, int(os.environ.get('LOCAL_RANK', rank)))
        return run(args)
    except SETUP_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
