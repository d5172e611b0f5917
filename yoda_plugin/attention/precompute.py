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
* Settings: an output whose ``yoda_attention.json`` records other settings (source, its options, the grid) is
  refused before anything is written, naming the differing keys; with ``force`` it is archived
  (``<output>_archived_<time>``, its leftover shards too) and made afresh (:func:`check_output_settings`).

A run is described by a :class:`PrecomputeConfig`; :func:`run` (one process) and
:func:`run_distributed` (one torchrun rank) return 0, or 1 when an image failed, and raise
:data:`SETUP_ERRORS` for bad options or inputs. The command line (parsing, exit codes) is
:mod:`yoda_plugin.apps.precompute_attention`.
"""
import datetime
import inspect
import os
from dataclasses import dataclass, field
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

import lmdb
import numpy as np
import torch
from tqdm import tqdm

from yoda_plugin.attention import ATTENTION_SOURCES, AttentionSource, build_attention_source
from yoda_plugin.attention.previews import Item, write_previews
from yoda_plugin.data.image_io import decode_image
from yoda_plugin.data.transforms import resize_attention as resize_map
from yoda_plugin.data.attention_lmdb import (META_FILE, AttentionLMDBLockedError, AttentionLMDBWriter, _full_meta,
                                             encode_attention, make_attention_meta, read_attention_meta,
                                             read_meta_info, validate_key)
from yoda_plugin.utils.fingerprint import SettingsMismatch, archive, differences, flatten

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


# --------------------------------------------------------------------------- inputs

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


def build_source(source: str, source_opts: Optional[dict] = None, device: Optional[str] = None,
                 local_rank: Optional[int] = None) -> AttentionSource:
    """The attention source ``source`` with its options; ``device`` goes to sources whose constructor takes one
    (under torchrun a bare ``cuda`` is ``cuda:<local_rank>``), and is still checked for the others."""
    opts = dict(source_opts or {})
    if source_takes_device(source):
        if 'device' in opts:
            if device is not None and str(opts['device']) != device:
                raise UsageError(f'--device {device} and --source-opt device={opts["device"]} disagree')
            opts['device'] = str(resolve_device(str(opts['device']), local_rank))
        else:
            opts['device'] = str(resolve_device(device, local_rank))
    elif device is not None:
        try:  # still reject a nonsense --device; the source itself runs on the CPU and ignores it
            torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise UsageError(f'--device {device!r} is not a torch device: {err}') from None
    return build_attention_source(source, **opts)


def load_items(input_path: str):
    """(items, closable LMDB input or None) of an image folder or BasicSR LMDB; an input without images is a
    usage error (nothing is created)."""
    if is_lmdb_folder(input_path):
        lmdb_input = LMDBImages(input_path)
        items = lmdb_input.items()
        if not items:
            lmdb_input.close()
            raise UsageError(f'--input {input_path} holds no images: its meta_info.txt lists no keys')
        return items, lmdb_input
    items = folder_items(input_path)
    if not items:
        raise UsageError(f'--input {input_path} holds no images (files ending in '
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


def process_items(source: AttentionSource, items: Sequence[Item], writer: AttentionLMDBWriter,
                  size: Optional[Tuple[int, int]] = None, scale: Optional[float] = None, batch_size: int = 1,
                  commit_every: int = 1, done: Set[str] = frozenset(), desc: str = '', show_progress: bool = True,
                  prefix: str = ''):
    """Compute and store the maps of ``items`` not yet in ``writer`` (nor in ``done``): ``batch_size`` images per
    source call, resized to ``size`` or by ``scale`` (else kept on the image's grid), ``commit_every`` maps per
    transaction.

    Returns (written, skipped, failed) with failed = [(key, reason)].
    """
    written = skipped = 0
    failed: List[Tuple[str, str]] = []
    pbar = tqdm(total=len(items), unit='img', disable=not show_progress, desc=desc)
    out = BufferedWriter(writer, commit_every)

    def fail(key, reason):
        failed.append((key, reason))
        tqdm.write(f'{prefix}failed {key}: {reason}', file=sys.stdout)

    pending: List[Tuple[str, np.ndarray]] = []

    def flush():
        nonlocal written
        for key, amap, error in compute_maps(source, pending):
            if error is None:
                try:
                    out.add(key, resize_map(np.asarray(amap), output_size(amap.shape, size, scale)))
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
            if len(pending) >= batch_size:
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

@dataclass
class PrecomputeConfig:
    """One precompute run: what ``scripts/precompute_attention.py``'s options of the same names set.

    ``source_opts`` are the source's keyword arguments; ``size`` (H, W) or ``scale`` put the maps on another grid;
    ``dist_timeout`` is in minutes; ``force`` archives an output made with other settings instead of refusing it.
    """
    input: str
    output: str
    source: str
    source_opts: Dict[str, object] = field(default_factory=dict)
    size: Optional[Tuple[int, int]] = None
    scale: Optional[float] = None
    device: Optional[str] = None
    batch_size: int = 1
    compress_level: int = 1
    map_size: int = 1024 ** 3
    commit_every: int = 64
    previews: Optional[str] = None
    preview_count: int = 8
    dist_timeout: float = 24 * 60.0
    show_progress: bool = True
    force: bool = False

    def check(self) -> None:
        """UsageError naming the option of a value no run can use."""
        if self.size is not None and (len(self.size) != 2 or self.size[0] < 1 or self.size[1] < 1):
            raise UsageError(f'--size must be positive, got {" ".join(str(v) for v in self.size)}')
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f'--scale must be a positive number, got {self.scale}')
        if self.size is not None and self.scale is not None:
            raise UsageError('--size and --scale exclude each other')
        if self.batch_size < 1:
            raise UsageError('--batch-size must be >= 1')
        if not 0 <= self.compress_level <= 9:
            raise UsageError('--compress-level must be in 0..9')
        if self.commit_every < 1:
            raise UsageError('--commit-every must be >= 1')
        if self.preview_count < 0:
            raise UsageError('--preview-count must be >= 0')
        if not self.dist_timeout > 0:
            raise UsageError('--dist-timeout must be positive')
        if not os.path.isdir(self.input):
            raise UsageError(f'--input {self.input} is not a folder')
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            raise UsageError('--output must differ from --input')


def check_output_settings(output: str, meta: dict, force: bool = False, log=print) -> Optional[str]:
    """Before anything is written: refuse an existing ``output`` whose maps were made with other settings
    (:class:`~yoda_plugin.utils.fingerprint.SettingsMismatch`, a ValueError: one line naming the differing keys
    and the choices). With ``force`` the output and its leftover shards are archived instead; returns the
    archive's path (None when nothing was archived)."""
    if not os.path.isfile(os.path.join(output, META_FILE)):
        return None
    diffs = differences(flatten(read_attention_meta(output)), flatten(_full_meta(meta)))
    if not diffs:
        return None
    if not force:
        raise SettingsMismatch('attention maps', os.path.abspath(output), diffs, 'write to another --output',
                               'rerun with --force')
    moved = archive(output)
    if os.path.isdir(shard_root(output)):
        archive(shard_root(output))
    log(f'--force: {output} held maps made with other settings ({"; ".join(diffs[:6])}); archived to {moved}')
    return moved


def _summary(output, written, skipped, failed, seconds) -> int:
    print(f'{output}: written {written}, skipped {skipped} (already present), failed {len(failed)}, '
          f'{seconds:.1f} s')
    if failed:
        print(f'{len(failed)} image(s) failed:')
        for key, reason in failed:
            print(f'  {key}: {reason}')
        return 1
    return 0


def run(config: PrecomputeConfig) -> int:
    """Single process: leftover shards of an interrupted sharded run are merged first, then maps are computed
    straight into ``config.output``. 0, or 1 when an image failed (listed in the summary)."""
    source = build_source(config.source, config.source_opts, config.device)
    meta = make_attention_meta(source, **grid_meta(config.size, config.scale))
    check_output_settings(config.output, meta, config.force)
    items, lmdb_input = load_items(config.input)
    start = time.perf_counter()
    try:
        with AttentionLMDBWriter(config.output, meta, map_size=config.map_size,
                                 compress_level=config.compress_level) as writer:
            merge_shards(writer, config.output)
            if config.previews and config.preview_count:
                n = write_previews(source, items[:config.preview_count], config.previews)
                print(f'previews: {n} written to {config.previews}')
            written, skipped, failed = process_items(
                source, items, writer, config.size, config.scale, config.batch_size, config.commit_every,
                desc=f'{config.source} attention', show_progress=config.show_progress)
    finally:
        if lmdb_input is not None:
            lmdb_input.close()
    return _summary(config.output, written, skipped, failed, time.perf_counter() - start)


def _all_max(value: int) -> int:
    import torch.distributed as dist
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_distributed(config: PrecomputeConfig, rank: int, world: int, local_rank: int) -> int:
    """One rank of a torchrun job (the sharding section of scripts/precompute_attention.py's docstring): keys
    ``rank, rank + world, ...`` go into the rank's shard, rank 0 merges all shards. Every rank returns the same
    exit status (2 for a setup error on any rank, which prints it)."""
    import torch.distributed as dist
    dist.init_process_group('gloo', timeout=datetime.timedelta(minutes=config.dist_timeout))
    final = shard = lmdb_input = None
    prefix = f'[rank {rank}] '
    try:
        # 1. setup: rank 0 opens (creates, checks, locks) the final output; errors on any rank stop all with 2
        status, done = 0, set()
        try:
            source = build_source(config.source, config.source_opts, config.device, local_rank)
            meta = make_attention_meta(source, **grid_meta(config.size, config.scale))
            items, lmdb_input = load_items(config.input)
            if rank == 0:
                check_output_settings(config.output, meta, config.force)
                final = AttentionLMDBWriter(config.output, meta, map_size=config.map_size,
                                            compress_level=config.compress_level)
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
            shard = AttentionLMDBWriter(shard_path(config.output, rank), meta, map_size=config.map_size,
                                        compress_level=config.compress_level)
        except SETUP_ERRORS as err:
            print(f'{prefix}error: {err}', file=sys.stderr)
            status = 2
        if _all_max(status):
            return 2

        # 2. compute this rank's share into its shard
        start = time.perf_counter()
        if rank == 0 and config.previews and config.preview_count:
            n = write_previews(source, items[:config.preview_count], config.previews)
            print(f'previews: {n} written to {config.previews}')
        mine = items[rank::world]
        written, skipped, failed = process_items(
            source, mine, shard, config.size, config.scale, config.batch_size, config.commit_every, done=done,
            desc=f'{config.source} attention (rank 0 of {world})', show_progress=rank == 0 and config.show_progress,
            prefix=prefix)
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
                merge_shards(final, config.output)
                final.close()
                code = _summary(config.output, written, skipped, failed, time.perf_counter() - start)
            except SETUP_ERRORS as err:
                print(f'error: merging the shards into {config.output} failed: {err}', file=sys.stderr)
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


def run_job(config: PrecomputeConfig) -> int:
    """:func:`run_distributed` when this process is one rank of a torchrun job (``WORLD_SIZE`` > 1), else
    :func:`run`."""
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    if world > 1:
        rank = int(os.environ.get('RANK', '0'))
        return run_distributed(config, rank, world, int(os.environ.get('LOCAL_RANK', rank)))
    return run(config)
