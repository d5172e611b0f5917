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
metadata of another configuration, missing weights) give 2, and so does a full
disk: one line "error: no space left on <path> ..." and no traceback; the maps
committed before stay, so a rerun with space resumes.

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

This script only parses the command line; the work is done by
``yoda_plugin.attention.precompute`` (previews: ``yoda_plugin.attention.previews``).
"""
import argparse
import os
import sys

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yoda_plugin.attention import ATTENTION_SOURCES
from yoda_plugin.attention import precompute


def build_parser() -> argparse.ArgumentParser:
    precompute.load_attention_sources()
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


def main(argv=None) -> int:
    """Parse ``argv`` and run; the exit status: 0, 1 (an image failed), 2 (usage or setup error, full disk)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        precompute.check_args(args)
    except precompute.UsageError as err:
        parser.error(str(err))
    return precompute.run_from_args(args)


if __name__ == '__main__':
    sys.exit(main())
