#!/usr/bin/env python
"""Sparse YODA sampling on a trained checkpoint: speed and how far its output moves from dense sampling.

    python scripts/benchmark_sparse_quality.py --opt options/demo/test_sr3_yoda_demo.yml \
        [--checkpoint net_g_latest.pth] [--variants bbox:8 regions:8 regions:0] [--region-cost 0] \
        [--max-fraction 0.9] [--num-images N] [--device cpu]

Runs the option file's test set (its model: SR3Model or SRDiffModel, YODA on)
once densely and once per ``MODE:MARGIN`` variant of ``val.sparse``, every image
with the same sampling seed, and prints one table: the option file's metrics
against HR (``val.metrics``), the PSNR of each variant's output against the
dense output (8-bit RGB, the approximation error of cropping), the share of
the dense network pixels evaluated, and seconds per image. Check this on your
checkpoint before enabling ``val.sparse`` for anything you report.
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'analysis'))

import common  # noqa: E402  (repository on sys.path, yoda_plugin imported)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--opt', required=True, help='test option file (model, network, diffusion, yoda, test dataset)')
    p.add_argument('--checkpoint', help='default: the option file\'s path.pretrain_network_g')
    p.add_argument('--param-key', default='params_ema')
    p.add_argument('--dataset', help='dataset section or name (default: the first test/val section)')
    p.add_argument('--variants', nargs='+', type=common.parse_sparse_spec,
                   default=[('bbox', 8), ('regions', 8), ('regions', 0)], help='MODE:MARGIN of each sparse run')
    p.add_argument('--region-cost', type=float, default=0, help='val.sparse.region_cost (pixels per network call)')
    p.add_argument('--max-fraction', type=float, default=0.9, help='val.sparse.max_fraction')
    p.add_argument('--num-images', type=int, help='only the first N images')
    p.add_argument('--sample-steps', type=int, help='override diffusion.sample_steps')
    p.add_argument('--seed', type=int, default=0, help='image i samples with seed + i')
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)

    from basicsr.metrics import calculate_metric
    import numpy as np
    from basicsr.utils import tensor2img
    from torch.utils.data import default_collate

    opt = common.load_options(args.opt)
    resolvers = {}
    if not ((opt.get('yoda') or {}).get('enabled', False)):
        raise SystemExit(f'{args.opt}: yoda.enabled is false; sparse sampling only applies to YODA')
    dataset = common.build_dataset(args.opt, args.dataset, require_attention=True)
    metrics_opt = (opt.get('val') or {}).get('metrics') or {}
    names = ['dense'] + [f'{m}:{k}' for m, k in args.variants]
    sparse_opts = {'dense': {'enabled': False}}
    for (mode, margin), name in zip(args.variants, names[1:]):
        sparse_opts[name] = {'enabled': True, 'mode': mode, 'margin': margin, 'max_fraction': args.max_fraction,
                             'region_cost': args.region_cost}
    for name in names:
        resolvers[name] = common.build_resolver(args.opt, args.checkpoint, args.param_key, args.device,
                                                args.sample_steps, sparse=sparse_opts[name])
    from yoda_plugin.utils.progress import Progress
    rows = {name: {'seconds': [], 'pixels': [], 'vs_dense': [], **{m: [] for m in metrics_opt}} for name in names}
    count = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    batches = [default_collate([dataset[idx]]) for idx in range(count)]
    hrs = [tensor2img([b['gt']]) if 'gt' in b else None for b in batches]
    metric_cols = list(metrics_opt) if hrs and hrs[0] is not None else []
    print(f'\nSparse YODA sampling on {args.opt} ({count} images, {resolvers["dense"].pipeline.steps} steps, '
          f'{args.device}; region_cost {args.region_cost:g}, max_fraction {args.max_fraction:g})')
    print('| variant | ' + ' | '.join(metric_cols + ['PSNR vs dense, dB', 'pixels evaluated', 's/image',
                                                      'time / dense']) + ' |')
    print('| --- ' * (len(metric_cols) + 5) + '|', flush=True)
    mean = statistics.fmean
    # One variant at a time (dense first: the reference), so that each row is printed as soon as it is measured.
    progress = Progress(f'{len(names)} variants x {count} images (dense first)', len(names) * count, unit='images',
                        prefix='sparse-quality')
    dense_imgs, dense_s = [], None
    for name in names:
        for idx, batch in enumerate(batches):
            start = time.perf_counter()
            out = resolvers[name].sample_prepared(batch['lq'], batch['lq_up'], batch['attention'], args.seed + idx)
            rows[name]['seconds'].append(time.perf_counter() - start)
            img = tensor2img([out.detach().cpu()])
            stats = resolvers[name].last_info['sparse_stats']
            rows[name]['pixels'].append(1.0 if stats is None else stats['pixels'] / max(1, stats['dense_pixels']))
            if name == 'dense':
                dense_imgs.append(img)
            rows[name]['vs_dense'].append(float(np.mean((img.astype(np.float64) - dense_imgs[idx]) ** 2)))
            if hrs[idx] is not None:
                for metric, mopt in metrics_opt.items():
                    rows[name][metric].append(float(calculate_metric({'img': img, 'img2': hrs[idx]}, mopt)))
            progress.update(detail=f'{name}, image {idx + 1}/{count}')
        r = rows[name]
        if dense_s is None:
            dense_s = mean(r['seconds'])
        mse = mean(r['vs_dense'])  # pooled over the images: one identical image does not make it inf
        vs = float('inf') if mse == 0 else 10 * math.log10(255.0**2 / mse)
        cells = [f'{mean(r[m]):.4f}' for m in metric_cols]
        cells += ['inf (reference)' if name == 'dense' else ('inf' if vs == float('inf') else f'{vs:.2f}'),
                  f'{mean(r["pixels"]):.3f}', f'{mean(r["seconds"]):.3f}', f'{mean(r["seconds"]) / dense_s:.3f}']
        print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)
    progress.done()
    return 0


if __name__ == '__main__':
    sys.exit(main())
