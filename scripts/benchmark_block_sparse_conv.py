#!/usr/bin/env python
"""Would per-layer block-sparse convolutions beat cropping? A measurement, not a feature.

Cropping (``val.sparse``) pays for context at every crop edge. The alternative
is to run each convolution of the UNet only on the active blocks (gather each
block with a one-pixel halo, convolve, scatter back), so that neighbouring
active blocks give each other real context. This script times that gather-
convolve-scatter in plain PyTorch against a dense 3x3 convolution at each level
of the paper's SR3 UNet (channels 64 * (1, 2, 4, 8, 8) at HR / 2^level), with
the block size halving per level, and adds the levels up weighted by their
dense time: the estimated convolution time of a block-sparse UNet relative to
the dense one, next to the share of active blocks (the same blocks at every level). The block-sparse result
equals the dense convolution on the active blocks (checked every run).

    python scripts/benchmark_block_sparse_conv.py --size 256 --block 16 32 --active 0.5
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from yoda_plugin.utils.progress import Progress
except ImportError:  # run from a checkout without installing the package
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from yoda_plugin.utils.progress import Progress

CHANNEL_MULTS = (1, 2, 4, 8, 8)  # the paper's SR3 UNet, base 64 channels


def block_sparse_conv3x3(x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor, block: int) -> torch.Tensor:
    """3x3 convolution (padding 1) evaluated on the ``blocks`` (n, 2) block indices only; zeros elsewhere."""
    n, c, h, w = x.shape
    rows, cols = h // block, w // block
    halo = F.pad(x, (1, 1, 1, 1)).unfold(2, block + 2, block).unfold(3, block + 2, block)  # n,c,rows,cols,b+2,b+2
    picked = halo[:, :, blocks[:, 0], blocks[:, 1]]  # n, c, k, b+2, b+2
    k = picked.shape[2]
    picked = picked.permute(0, 2, 1, 3, 4).reshape(n * k, c, block + 2, block + 2)
    out = F.conv2d(picked, weight).view(n, k, -1, block, block).permute(0, 2, 1, 3, 4)
    canvas = x.new_zeros(n, out.shape[1], rows, cols, block, block)
    canvas[:, :, blocks[:, 0], blocks[:, 1]] = out
    return canvas.permute(0, 1, 2, 4, 3, 5).reshape(n, -1, h, w)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=256, help='HR size (the UNet diffuses on the HR grid)')
    p.add_argument('--block', type=int, nargs='+', default=[16, 32], help='block size at full resolution (px)')
    p.add_argument('--active', type=float, default=0.5, help='share of active blocks (random, seeded)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.active <= 1:
        p.error(f'--active must be in (0, 1], got {args.active}')
    g = torch.Generator().manual_seed(args.seed)
    print(f'\nBlock-sparse 3x3 convolution / dense, paper SR3 UNet levels at {args.size}x{args.size}, batch 1, '
          f'{args.active:.0%} of blocks active (random), CPU ({torch.get_num_threads()} threads)')
    print('| block at full res | ' + ' | '.join(f'level {k} ({64 * m} ch, {args.size >> k} px)'
                                             for k, m in enumerate(CHANNEL_MULTS)) + ' | UNet estimate | active |')
    print('| --- ' * (len(CHANNEL_MULTS) + 3) + '|', flush=True)
    for block0 in args.block:
        if args.size % block0:
            p.error(f'--size {args.size} is not a multiple of --block {block0}')
    # Level k has (HR / 2^k)^2 pixels and 64 * mult channels: weigh the estimate of the time left by its FLOPs.
    weights = [(args.size >> k) ** 2 * (64 * m) ** 2 for k, m in enumerate(CHANNEL_MULTS)]
    progress = Progress(f'{len(args.block)} block sizes x {len(CHANNEL_MULTS)} UNet levels, dense and block-sparse '
                        f'({args.repeats} repeats each)', len(args.block) * len(CHANNEL_MULTS), unit='levels',
                        prefix='block-sparse', weights=weights * len(args.block))
    for block0 in args.block:
        grid = args.size // block0  # the same block grid at every level (blocks halve with the resolution)
        active = torch.rand(grid, grid, generator=g) < args.active
        active.view(-1)[0] = True  # at least one block
        blocks, share = torch.nonzero(active), float(active.float().mean())
        cells, dense_total, sparse_total = [], 0.0, 0.0
        for level, mult in enumerate(CHANNEL_MULTS):
            size, channels, block = args.size >> level, 64 * mult, block0 >> level
            x = torch.randn(1, channels, size, size, generator=g)
            weight = torch.randn(channels, channels, 3, 3, generator=g) * 0.02
            dense = median_time(lambda: F.conv2d(x, weight, padding=1), args.repeats)
            if block < 1:  # smaller than a pixel: this level stays dense
                cells.append('dense')
                dense_total, sparse_total = dense_total + dense, sparse_total + dense
                progress.update(detail=f'block {block0} px, level {level}: dense only')
                continue
            sparse = median_time(lambda: block_sparse_conv3x3(x, weight, blocks, block), args.repeats)
            # Exactness: on the active blocks the gathered convolution is the dense one.
            keep = active.repeat_interleave(block, 0).repeat_interleave(block, 1)
            ref, got = F.conv2d(x, weight, padding=1), block_sparse_conv3x3(x, weight, blocks, block)
            if not torch.allclose(ref[..., keep], got[..., keep], atol=1e-4) or got[..., ~keep].abs().max() > 0:
                raise AssertionError(f'block-sparse convolution differs from dense at level {level}')
            best = min(sparse, dense)  # a real implementation would keep a level dense when that is cheaper
            cells.append(f'{sparse / dense:.2f} (halo {(block + 2) ** 2 / block ** 2:.2f}x)')
            dense_total, sparse_total = dense_total + dense, sparse_total + best
            progress.update(detail=f'block {block0} px, level {level}: {sparse / dense:.2f} of dense')
        print(f'| {block0} | ' + ' | '.join(cells) + f' | {sparse_total / dense_total:.3f} | {share:.3f} |',
              flush=True)
    progress.done()
    print('UNet estimate: sum over levels of min(block-sparse, dense) time / sum of dense time (3x3 convolutions '
          'only; GroupNorm and attention come on top); active: the share of active blocks, the limit a free '
          'sparse convolution would reach.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
