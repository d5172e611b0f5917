#!/usr/bin/env python
"""Precompute attention maps of LR images into a BasicSR-layout LMDB.

    python scripts/precompute_attention.py --input DIR_OR_LMDB --output OUT.lmdb --source edge \
        [--source-opt key=value ...] [--size H W | --scale S] [--device cuda|cpu] [--batch-size N] \
        [--previews DIR [--preview-count N]] [--force]
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

``--force``: an output whose ``yoda_attention.json`` records other settings (source, its options, the grid)
is refused before anything is written, with one line naming the differing keys; ``--force`` archives it
(``<output>_archived_<time>``, with its leftover shards) and makes it afresh.

The command line is ``yoda_plugin.apps.precompute_attention`` (also ``python -m yoda_plugin precompute``); the
work is done by ``yoda_plugin.attention.precompute`` (previews: ``yoda_plugin.attention.previews``).
"""
import os
import sys

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yoda_plugin.apps.precompute_attention import build_parser, main  # noqa: E402,F401

if __name__ == '__main__':
    sys.exit(main())
