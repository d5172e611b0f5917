"""The command line of ``scripts/precompute_attention.py`` (``python -m yoda_plugin precompute``): options to a
:class:`~yoda_plugin.attention.precompute.PrecomputeConfig`, run, and the exit status. The script's docstring is
the user documentation.

Exit status: 0; 1 when an image failed (the rest is written); 2 for a usage or setup error (bad options,
another writer holding the output, an output made with other settings, missing weights) and for a full disk:
one line ``error: ...``, no traceback.
"""
import argparse
import sys

import lmdb

from yoda_plugin.attention import ATTENTION_SOURCES, parse_source_opts
from yoda_plugin.attention import precompute
from yoda_plugin.utils.disk import DISK_FULL_EXIT_CODE, disk_full_error


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
    p.add_argument('--force', action='store_true',
                   help='an output made with other settings (source, options, grid) is archived '
                   '(<output>_archived_<time>) and made afresh, instead of refused')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def config_from_args(args: argparse.Namespace) -> precompute.PrecomputeConfig:
    """The run a parsed command line asks for; UsageError (a ValueError) for unusable ``--source-opt`` pairs."""
    try:
        source_opts = parse_source_opts(args.source_opt)
    except ValueError as err:
        raise precompute.UsageError(str(err)) from None
    return precompute.PrecomputeConfig(
        input=args.input, output=args.output, source=args.source, source_opts=source_opts,
        size=tuple(args.size) if args.size is not None else None, scale=args.scale, device=args.device,
        batch_size=args.batch_size, compress_level=args.compress_level, map_size=args.map_size,
        commit_every=args.commit_every, previews=args.previews, preview_count=args.preview_count,
        dist_timeout=args.dist_timeout, show_progress=not args.no_progress, force=args.force)


def run_config(config: precompute.PrecomputeConfig) -> int:
    """Run ``config`` (one process, or one torchrun rank); the exit status 0, 1 or 2, errors as one line."""
    try:
        return precompute.run_job(config)
    except precompute.SETUP_ERRORS as err:
        print(f'error: {" ".join(str(err).split())}', file=sys.stderr)
        return 2
    except (lmdb.Error, OSError) as err:  # DiskFullError from the writer, or a raw error on a full disk
        full = disk_full_error(err, getattr(err, 'path', None) or config.output)
        if full is None:
            raise
        print(f'error: {full}', file=sys.stderr)  # one line, no traceback; committed maps stay (rerun resumes)
        return DISK_FULL_EXIT_CODE


def main(argv=None) -> int:
    """Parse ``argv`` and run; the exit status: 0, 1 (an image failed), 2 (usage or setup error, full disk)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except precompute.UsageError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    try:
        config.check()
    except precompute.UsageError as err:
        parser.error(str(err))
    return run_config(config)


if __name__ == '__main__':
    sys.exit(main())
