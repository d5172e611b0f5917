#!/usr/bin/env python
"""Paper Fig. 5: share of the image refined at each time step (T -> 0), mean and std band per source.

    python scripts/analysis/refined_area_over_time.py --opt options/test_sr3_yoda.yml \
        --attention ResNet-50=datasets/CelebA-HQ/attention_dino_resnet50_max_16.lmdb \
        --attention ViT-S/8=datasets/CelebA-HQ/attention_dino_vits8_max_16.lmdb --out figures/

The refined share at training time step t is the mean of M(t) (Eq. 9:
T (A + l) >= t) over the image. ``--grid training`` (default) evaluates every
t = T..1, ``--grid sampling`` only the T_eval steps sampling visits. Maps on the
LR grid are resized to the HR grid (option file's ``scale``) as the dataset
does. Writes ``refined_area_over_time.png`` and ``.csv`` (mean and std per t and source).
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402


def refined_share(amap: np.ndarray, lower_bound: float, num_timesteps: int, ts: np.ndarray) -> np.ndarray:
    """Share of the map's pixels refined (M(t) = 1, Eq. 9) at each training time step in ``ts``."""
    import torch

    from yoda_plugin.core import YODAMask
    mask = YODAMask(torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32)), lower_bound, num_timesteps)
    return mask.refined_share(torch.as_tensor(np.asarray(ts, np.float64)))[0].numpy()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--attention', action='append', required=True, metavar='[LABEL=]LMDB')
    p.add_argument('--opt', help='option file for l, T_train, T_eval and scale')
    p.add_argument('--lower-bound', type=float)
    p.add_argument('--num-timesteps', type=int, help='T_train')
    p.add_argument('--sample-steps', type=int, help='T_eval')
    p.add_argument('--scale', type=int, help='resize LR-grid maps by this factor (default: the options\' scale)')
    p.add_argument('--grid', choices=('training', 'sampling'), default='training')
    p.add_argument('--max-images', type=int)
    p.add_argument('--out', required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opt = common.load_options(args.opt) if args.opt else {}
    lb, T, K = common.yoda_timing(opt, args.lower_bound, args.num_timesteps, args.sample_steps)
    if args.grid == 'training':
        ts = np.arange(T, 0, -1)
    else:
        ts = common.sampling_timesteps(T, K).numpy()[1:][::-1]
    scale_opt = args.scale if args.scale is not None else opt.get('scale')
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = []
    for spec in args.attention:
        label, path = common.label_and_path(spec)
        scale = scale_opt if common.attention_grid(path) == 'lr' else None
        maps = common.read_attention_maps(path, max_images=args.max_images)
        shares = np.stack([refined_share(common.to_hr_grid(m, scale), lb, T, ts) for m in maps.values()])
        mean, std = shares.mean(0), shares.std(0)
        line, = ax.plot(ts, 100 * mean, label=f'{label} (n={len(maps)})')
        ax.fill_between(ts, 100 * np.clip(mean - std, 0, 1), 100 * np.clip(mean + std, 0, 1),
                        color=line.get_color(), alpha=0.25, lw=0)
        rows += [(label, int(t), float(m), float(s)) for t, m, s in zip(ts, mean, std)]
        start = ts[np.argmax(mean > 0)] if (mean > 0).any() else None
        print(f'{label}: {len(maps)} maps; refinement starts at t={start}, mean share at t=T/2: '
              f'{mean[np.argmin(np.abs(ts - T / 2))]:.3f}')
    ax.set_xlim(T, 0)  # sampling runs T -> 0
    ax.set_ylim(0, 101)
    ax.set_xlabel('time step t (sampling goes T -> 0)')
    ax.set_ylabel('refined image area [%]')
    ax.set_title(f'Refined area over time (l = {lb:g}, T = {T})')
    ax.legend(fontsize=8, loc='lower right')
    ax.grid(alpha=0.3)
    os.makedirs(args.out, exist_ok=True)
    common.save_figure(fig, os.path.join(args.out, 'refined_area_over_time.png'))
    csv_path = os.path.join(args.out, 'refined_area_over_time.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['source', 't', 'mean_share', 'std_share'])
        w.writerows(rows)
    print(f'wrote {csv_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
