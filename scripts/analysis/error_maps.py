#!/usr/bin/env python
"""Supplement Fig. 5: error maps |SR - HR| of two (or more) test runs, with the attention map.

    python scripts/analysis/error_maps.py --opt options/test_sr3_yoda.yml \
        --sr SR3=results/test_SR3_16_128_CelebA-HQ --sr SR3+YODA=results/test_SR3_YODA_16_128_CelebA-HQ \
        --num-images 4 --out figures/

HR images and attention maps come from the option file's test dataset
(``--hr`` / ``--attention`` override it; LMDB or image folder). SR images are
found in each result folder (``results/<name>`` or its
``visualization/<dataset>``) as ``<key>_<suffix>.png``. The error is the mean
absolute difference over RGB in [0, 1]; all error maps share one colour scale
(``--vmax``, default the 99th percentile over all of them): brighter = higher
error. Writes ``error_maps.png`` (one row per image: attention, HR, then SR and
error per run) and prints the mean absolute error of each run.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402


def error_map(sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    if sr.shape != hr.shape:
        raise ValueError(f'SR {sr.shape} and HR {hr.shape} differ in size')
    return np.abs(sr.astype(np.float64) - hr.astype(np.float64)).mean(axis=2)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sr', action='append', required=True, metavar='[LABEL=]DIR', help='result folder (repeatable)')
    p.add_argument('--opt', help='test option file whose dataset gives HR images and attention maps')
    p.add_argument('--dataset', help='dataset section or name in the options')
    p.add_argument('--hr', help='HR images (folder or LMDB), overrides the options')
    p.add_argument('--attention', help='attention LMDB, overrides the options')
    p.add_argument('--scale', type=int, help='SR scale (default: the options\')')
    p.add_argument('--suffix', help='SR file suffix (default: detected)')
    p.add_argument('--keys', nargs='+')
    p.add_argument('--num-images', type=int, default=4)
    p.add_argument('--vmax', type=float, help='upper end of the error colour scale')
    p.add_argument('--cmap', default='inferno')
    p.add_argument('--out', required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dataset = common.build_dataset(args.opt, args.dataset, hr=args.hr, attention=args.attention, scale=args.scale)
    runs = [common.label_and_path(s) for s in args.sr]
    names = common.result_names(dataset)
    found = [(label, common.find_sr_images(path, dataset.keys, args.suffix, names)) for label, path in runs]
    keys = args.keys or [k for k in dataset.keys if all(k in f for _, f in found)][:args.num_images]
    if not keys:
        raise SystemExit('no image key has an SR image in every result folder')
    index = {k: i for i, k in enumerate(dataset.keys)}
    rows = []
    for key in keys:
        data = dataset[index[key]]
        hr = data['gt'].permute(1, 2, 0).numpy()
        att = data['attention'][0].numpy() if 'attention' in data else None
        srs = [(label, common.read_rgb(f[key])) for label, f in found]
        rows.append((key, hr, att, [(label, sr, error_map(sr, hr)) for label, sr in srs]))
    errors = np.concatenate([e.ravel() for _, _, _, runs_ in rows for _, _, e in runs_])
    vmax = args.vmax or max(float(np.percentile(errors, 99)), 1e-6)
    for i, (label, _) in enumerate(found):
        mae = np.mean([runs_[i][2].mean() for _, _, _, runs_ in rows])
        print(f'{label}: mean absolute error {mae:.4f} over {len(rows)} image(s)')

    plt = common.pyplot()
    cols = 2 + 2 * len(found)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 1.9 * len(rows)), squeeze=False)
    for r, (key, hr, att, runs_) in enumerate(rows):
        panels = [('attention', att, 'viridis', 1.0), ('HR', hr, None, None)]
        for label, sr, err in runs_:
            panels += [(label, sr, None, None), (f'|{label} - HR|', err, args.cmap, vmax)]
        for c, (title, im, cmap, vm) in enumerate(panels):
            ax = axes[r, c]
            ax.axis('off')
            if im is None:
                continue
            ax.imshow(np.clip(im, 0, 1) if cmap is None else im, cmap=cmap, vmin=0 if cmap else None, vmax=vm)
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].text(-0.05, 0.5, key, transform=axes[r, 0].transAxes, rotation=90, va='center', ha='right',
                        fontsize=7)
    fig.suptitle(f'Error maps (brighter = higher error, scale 0..{vmax:.3f})', fontsize=9)
    os.makedirs(args.out, exist_ok=True)
    common.save_figure(fig, os.path.join(args.out, 'error_maps.png'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
