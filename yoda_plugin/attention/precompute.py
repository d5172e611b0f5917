"""Precomputing attention maps into a BasicSR-layout attention LMDB: the logic of
``scripts/precompute_attention.py`` (its docstring is the user documentation).

* Inputs: an image folder (:func:`folder_items`) or a BasicSR image LMDB
  (:class:`LMDBImages`); both give ``(key, loader)`` items whose loader decodes
  like BasicSR (:func:`decode_image`).
* Computing: :func:`process_items` batches images through the source, resizes
  the maps onto the requested grid and commits them through a
  :class:`BufferedWriter` (``--commit-every`` maps per transaction; the LMDB
  map grows in :func:`yoda_plugin.data.attention_lmdb.commit_pairs`, the one
  transaction path).
* Sharding: :func:`run_distributed` (one torchrun rank) writes
  ``<output>.shards/rank<r>.lmdb`` (:func:`shard_path`); :func:`merge_shards`
  folds them into the output.
* Previews: :mod:`yoda_plugin.attention.previews`.

:func:`run_from_args` runs a command line parsed by the script's parser (after
:func:`check_args`) and returns its exit status: 0, 1 (an image failed) or 2
(setup error).
"""
import datetime
import inspect
import json
import os
import re
import shutil
import sys
import time
from typing import List, Optional, Sequence, Set, Tuple

import cv2
import lmdb
import numpy as np
import torch
from tqdm import tqdm

from yoda_plugin.attention import ATTENTION_SOURCES, AttentionSource, build_attention_source
from yoda_plugin.attention.previews import Item, write_previews
from yoda_plugin.utils.disk import DISK_FULL_EXIT_CODE, disk_full_error
from yoda_plugin.data.attention_lmdb import (AttentionLMDBLockedError, AttentionLMDBWriter, encode_attention,
                                             make_attention_meta, read_meta_info, validate_key)

_NOT_SOURCES = ('precompute', 'previews')  # modules of yoda_plugin.attention that register no source


def load_attention_sources() -> None:
    """Import every module of ``yoda_plugin.attention`` so that all sources (DINO ones too) are registered.

    A module that fails to import is reported on stderr and skipped, so one broken
    optional source does not take the deterministic ones down with it.
    """
    import importlib
    import pkgutil

    import yoda_plugin.attention as package
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_SOURCES:
            continue
        try:
            importlib.import_module(f'{package.__name__}.{info.name}')
        except Exception as err:  # noqa: BLE001
            print(f'warning: attention sources of {package.__name__}.{info.name} unavailable: '
                  f'{type(err).__name__}: {err}', file=sys.stderr)


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm')


class UsageError(ValueError):
    """A bad option or input (exit status 2)."""


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
    """(items, closable LMDB input or None); an input without images is a usage error (nothing is created)."""
    if is_lmdb_folder(args.input):
        lmdb_input = LMDBImages(args.input)
        items = lmdb_input.items()
        if not items:
            lmdb_input.close()
            raise UsageError(f'--input {args.input} holds no images: its meta_info.txt lists no keys')
        return items, lmdb_input
    items = folder_items(args.input)
    if not items:
        raise UsageError(f'--input {args.input} holds no images (files ending in '
                         f'{", ".join(sorted(IMAGE_EXTENSIONS))}; subfolders are not searched)')
    return items, None


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


class BufferedWriter:
    """Encodes maps at once (invalid maps raise ValueError naming the key in :meth:`add`) and commits them to
    the writer ``every`` maps at a time (and on :meth:`flush`), each chunk in one transaction
    (:meth:`AttentionLMDBWriter.put_many_encoded`)."""

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
            self.writer.put_many_encoded(self.pending)
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
                        new = writer.put_many_encoded(pairs, overwrite=False)
                        added, present, pairs = added + new, present + len(pairs) - new, []
                if pairs:
                    new = writer.put_many_encoded(pairs, overwrite=False)
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


# --------------------------------------------------------------------------- running

def check_args(args) -> None:
    """UsageError for option values the parser cannot check itself (the script reports it as a usage error)."""
    if args.size is not None and (args.size[0] < 1 or args.size[1] < 1):
        raise UsageError(f'--size must be positive, got {args.size[0]} {args.size[1]}')
    if args.scale is not None and not (np.isfinite(args.scale) and args.scale > 0):
        raise UsageError(f'--scale must be a positive number, got {args.scale}')
    if args.batch_size < 1:
        raise UsageError('--batch-size must be >= 1')
    if not 0 <= args.compress_level <= 9:
        raise UsageError('--compress-level must be in 0..9')
    if args.commit_every < 1:
        raise UsageError('--commit-every must be >= 1')
    if args.preview_count < 0:
        raise UsageError('--preview-count must be >= 0')
    if not args.dist_timeout > 0:
        raise UsageError('--dist-timeout must be positive')
    if not os.path.isdir(args.input):
        raise UsageError(f'--input {args.input} is not a folder')
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UsageError('--output must differ from --input')


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
    """One rank of a torchrun job (the sharding section of scripts/precompute_attention.py's docstring): keys
    ``rank, rank + world, ...`` go into the rank's shard, rank 0 merges all shards. Every rank returns the same
    exit status."""
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


def run_from_args(args) -> int:
    """Run a parsed (and :func:`check_args`-checked) command line; the exit status 0, 1 or 2.

    Under torchrun (``WORLD_SIZE`` > 1) this process is one rank (:func:`run_distributed`), else a plain
    :func:`run`. Setup errors (:data:`SETUP_ERRORS`) are printed and give 2, and so does a full disk: one line
    "error: no space left on <path> ..." (:class:`~yoda_plugin.utils.disk.DiskFullError`), no traceback.
    """
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    try:
        if world > 1:
            rank = int(os.environ.get('RANK', '0'))
            return run_distributed(args, rank, world, int(os.environ.get('LOCAL_RANK', rank)))
        return run(args)
    except SETUP_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (lmdb.Error, OSError) as err:  # DiskFullError from the writer, or a raw error on a full disk
        full = disk_full_error(err, getattr(err, 'path', None) or args.output)
        if full is None:
            raise
        print(f'error: {full}', file=sys.stderr)  # one line, no traceback; committed maps stay (rerun resumes)
        return DISK_FULL_EXIT_CODE
