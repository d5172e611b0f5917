#!/usr/bin/env python
"""Paper Fig. 4: per-image ratio of YODA's pixel updates to those of full diffusion, per attention source.

    python scripts/analysis/ratio_of_diffused_pixels.py --opt options/test_sr3_yoda.yml \
        --attention ResNet-50=datasets/CelebA-HQ/attention_dino_resnet50_max_16.lmdb \
        --attention ViT-S/8=datasets/CelebA-HQ/attention_dino_vits8_max_16.lmdb --out figures/

For every map, ``yoda_plugin.core.pixel_update_ratio`` counts, per pixel, the
sampling steps with M(t) = 1 (Eq. 9 on the T_eval grid, t the training time
step) and divides by the steps of full diffusion. l, T_train and T_eval come
from the option file (``--lower-bound``, ``--num-timesteps``,
``--sample-steps`` override). Maps stored on the LR grid are resized to the HR
grid with the option file's ``scale`` as the dataset does, so the numbers match
``update_ratio`` of test summaries (``--scale 1`` keeps the stored grid). The
dashed line is the lower bound: the ratio of a pixel with A = 0.

Writes ``ratio_of_diffused_pixels.png`` and ``ratio_of_diffused_pixels.csv`` (one row per image and source).
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def ratios_for(maps, lower_bound, num_timesteps, sample_steps, scale=None):
    """key -> share of pixel updates vs full diffusion."""
    from yoda_plugin.core import pixel_update_ratio
    ts = common.sampling_timesteps(num_timesteps, sample_steps)
    out = {}
    for key, amap in maps.items():
        a = torch.from_numpy(np.ascontiguousarray(common.to_hr_grid(amap, scale)))
        out[key] = float(pixel_update_ratio(a, lower_bound, ts, num_timesteps)[0])
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--attention', action='append', required=True, metavar='[LABEL=]LMDB',
                   help='attention LMDB (repeatable), optionally labelled')
    p.add_argument('--opt', help='option file for l, T_train, T_eval and scale')
    p.add_argument('--lower-bound', type=float)
    p.add_argument('--num-timesteps', type=int, help='T_train')
    p.add_argument('--sample-steps', type=int, help='T_eval')
    p.add_argument('--scale', type=int, help='resize LR-grid maps by this factor (default: the options\' scale)')
    p.add_argument('--max-images', type=int, help='use at most this many maps per source')
    p.add_argument('--kind', choices=('box', 'violin'), default='box')
    p.add_argument('--out', required=True, help='output folder')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opt = common.load_options(args.opt) if args.opt else {}
    lb, T, K = common.yoda_timing(opt, args.lower_bound, args.num_timesteps, args.sample_steps)
    scale_opt = args.scale if args.scale is not None else opt.get('scale')
    labels, data, rows = [], [], []
    for spec in args.attention:
        label, path = common.label_and_path(spec)
        maps = common.read_attention_maps(path, max_images=args.max_images)
        scale = scale_opt if common.attention_grid(path) == 'lr' else None
        ratios = ratios_for(maps, lb, T, K, scale)
        labels.append(label)
        data.append(np.array(list(ratios.values())))
        rows += [(label, key, r) for key, r in ratios.items()]
        print(f'{label}: {len(ratios)} maps, mean ratio {data[-1].mean():.4f} (min {data[-1].min():.4f}, '
              f'max {data[-1].max():.4f})')
    floor = ratios_for({'zero': np.zeros((8, 8), np.float32)}, lb, T, K)['zero']

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 4))
    pos = np.arange(1, len(labels) + 1)
    if args.kind == 'violin':
        ax.violinplot(data, positions=pos, showmeans=True, showextrema=True)
    else:
        ax.boxplot(data, positions=pos, showmeans=True)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=20, ha='right')
    ax.axhline(floor, color='gray', ls='--', lw=1, label=f'lower bound l = {lb:g}')
    ax.axhline(1.0, color='black', lw=0.8)
    ax.set_ylabel('pixel updates / full diffusion')
    ax.set_ylim(0, 1.05)
    ax.set_title(f'Ratio of diffused pixels (T={T}, T_eval={K})')
    ax.legend(loc='lower right', fontsize=8)
    os.makedirs(args.out, exist_ok=True)
    common.save_figure(fig, os.path.join(args.out, 'ratio_of_diffused_pixels.png'))
    csv_path = os.path.join(args.out, 'ratio_of_diffused_pixels.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['source', 'image', 'ratio'])
        w.writerows(rows)
    print(f'wrote {csv_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
