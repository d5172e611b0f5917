#!/usr/bin/env python
"""Samplers on a trained checkpoint: quality against HR and against 200-step DDPM, update share, speed.

    python scripts/benchmark_samplers.py --opt options/demo/test_sr3_yoda_demo.yml \
        [--checkpoint net_g_latest.pth] [--runs ddpm:200 ddpm:100 ... ddim:20:0.5 dpmpp_2m:10] [--sparse regions:8] \
        [--num-images N] [--device cpu] [--csv out.csv]

For YODA (the option file's yoda section) and vanilla (YODA off at sampling,
same network), every ``TYPE:STEPS[:ETA]`` run samples the option file's test set
with the same seeds and prints one row as soon as it is measured: PSNR / SSIM
against HR (BasicSR's, RGB, crop_border = scale), PSNR against the reference
run (the first one, by default 200-step DDPM, of the same mode), the YODA
pixel-update share, seconds per image, and the speed-up over the reference.
``--sparse MODE:MARGIN`` adds the same runs with sparse YODA sampling.
"""
import argparse
import csv
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'analysis'))

import common  # noqa: E402  (repository on sys.path, yoda_plugin imported)

DEFAULT_RUNS = ('ddpm:200', 'ddpm:100', 'ddpm:50', 'ddpm:20', 'ddim:50', 'ddim:20', 'ddim:10', 'ddim:20:0.5',
                'dpmpp_2m:20', 'dpmpp_2m:10')


def parse_run(spec: str):
    """``TYPE:STEPS[:ETA]`` -> (type, steps, eta); ETA only for ddim."""
    from yoda_plugin.core.samplers import SamplerConfig
    try:
        config = SamplerConfig.from_spec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return config.type, config.steps, config.eta


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--opt', required=True, help='test option file (network, diffusion, yoda, test dataset)')
    p.add_argument('--checkpoint', help="default: the option file's path.pretrain_network_g")
    p.add_argument('--param-key', default='params_ema')
    p.add_argument('--dataset', help='dataset section or name (default: the first test/val section)')
    p.add_argument('--runs', nargs='+', type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS])
    p.add_argument('--sparse', type=common.parse_sparse_spec, metavar='MODE:MARGIN', help='also sparse YODA runs')
    p.add_argument('--modes', nargs='+', default=['yoda', 'vanilla'], choices=('yoda', 'vanilla'))
    p.add_argument('--num-images', type=int, help='only the first N images')
    p.add_argument('--seed', type=int, default=0, help='image i samples with seed + i')
    p.add_argument('--device', default='cpu')
    p.add_argument('--csv', help='also write the rows here')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    from basicsr.metrics import calculate_psnr, calculate_ssim

    from yoda_plugin import YODAResolver
    opt = common.load_options(args.opt)
    dataset = common.build_dataset(args.opt, args.dataset)
    n = min(len(dataset), args.num_images or len(dataset))
    items = [dataset[i] for i in range(n)]
    scale = int(opt['scale'])

    def to_uint8(t):
        return np.clip(np.round(t.permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)

    lrs, hrs = [to_uint8(it['lq']) for it in items], [to_uint8(it['gt']) for it in items]
    atts = [it['attention'][0].numpy() if 'attention' in it else None for it in items]
    modes = [(m, None) for m in args.modes]
    if args.sparse:
        modes.append(('yoda', args.sparse))
    header = ['mode', 'sampler', 'steps', 'psnr', 'ssim', 'psnr_vs_ref', 'update_share', 'sparse_pixels',
              'sec_per_image', 'speedup']
    print(f'{n} images of {args.opt}; reference per mode: {args.runs[0][0]}:{args.runs[0][1]}; one row per run, '
          f'printed when measured', flush=True)
    print(' | '.join(f'{h:>12}' for h in header), flush=True)
    rows, total = [], len(modes) * len(args.runs)
    from yoda_plugin.utils.progress import Progress
    progress = Progress(f'{total} runs (modes x samplers) x {n} images', total * n, unit='images', prefix='samplers',
                        weights=[steps for _ in modes for _, steps, _ in args.runs for _ in range(n)])
    for m_index, (mode, sparse) in enumerate(modes):
        ref_imgs, ref_sec = None, None
        for r_index, (kind, steps, eta) in enumerate(args.runs):
            overrides = {'sampler': {'type': kind, 'steps': steps, 'eta': eta}}
            if sparse:
                overrides['sparse'] = {'enabled': True, 'mode': sparse[0], 'margin': sparse[1]}
            run_opt = dict(opt)
            if mode == 'vanilla':
                run_opt['yoda'] = {'enabled': False}
            resolver = YODAResolver.from_options(run_opt, args.checkpoint, args.param_key, args.device, **overrides)
            outs, secs, shares, sparse_px = [], 0.0, [], []
            for i, (lr, att) in enumerate(zip(lrs, atts)):
                start = time.perf_counter()
                sr = resolver.super_resolve_one(lr, att if mode == 'yoda' else None, args.seed + i)
                secs += time.perf_counter() - start
                outs.append(to_uint8(sr[0].cpu()))
                shares.append(resolver.last_info['update_ratio'])
                stats = resolver.last_info['sparse_stats']
                if stats:
                    sparse_px.append(stats['pixels'] / max(1, stats['dense_pixels']))
                progress.update(detail=f'{mode} {kind}:{steps}, image {i + 1}/{n}')
            psnr = float(np.mean([calculate_psnr(o, h, scale) for o, h in zip(outs, hrs)]))
            ssim = float(np.mean([calculate_ssim(o, h, scale) for o, h in zip(outs, hrs)]))
            if ref_imgs is None:
                ref_imgs, ref_sec = outs, secs
            vs_ref = float(np.mean([calculate_psnr(o, r, 0) for o, r in zip(outs, ref_imgs)]))
            row = {'mode': mode + (f'+sparse {sparse[0]}:{sparse[1]}' if sparse else ''),
                   'sampler': kind + (f'(eta={eta:g})' if eta else ''),
                   'steps': steps, 'psnr': psnr, 'ssim': ssim, 'psnr_vs_ref': vs_ref,
                   'update_share': float(np.mean(shares)),
                   'sparse_pixels': float(np.mean(sparse_px)) if sparse_px else float('nan'),
                   'sec_per_image': secs / n, 'speedup': ref_sec / secs}
            rows.append(row)
            done = m_index * len(args.runs) + r_index + 1
            cells = [f'{v:>12.4f}' if isinstance(v, float) and not math.isinf(v) else f'{v!s:>12}'
                     for v in row.values()]
            print(' | '.join(cells) + f'   [{done}/{total}]', flush=True)
    progress.done()
    if args.csv:
        with open(args.csv, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        print(f'wrote {args.csv}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
