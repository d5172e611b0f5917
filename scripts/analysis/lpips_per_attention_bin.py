#!/usr/bin/env python
"""Supplement Sec. 5: LPIPS per attention bin (width 0.01) for SR, SR + YODA and bicubic, with degree-3 fits.

    python scripts/analysis/lpips_per_attention_bin.py --opt options/test_sr3_yoda.yml \
        --sr SR3=results/test_SR3_16_128_CelebA-HQ --sr SR3+YODA=results/test_SR3_YODA_16_128_CelebA-HQ \
        --lpips-weights ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth --out figures/

Exactly the supplement's procedure:

1. the (MAX-aggregated, DINO ResNet-50) attention map of each image, on the HR
   grid as the model uses it (from the option file's test dataset, or
   ``--attention``), is cut into bins [a, a + w) of width ``--bin-width``
   (0.01);
2. per bin a binary mask: 1 where the attention falls in the bin, else 0;
3. HR and each output (SR images of every ``--sr`` run and the bicubic
   upsampling, the SR3 condition ``lq_up``) are multiplied by the mask, so the
   masked-out regions are 0 (black) in both, and LPIPS (AlexNet) is computed
   between masked HR and masked output;
4. bins without a pixel in an image are skipped for that image; the mean over
   the images that have pixels in a bin is that bin's value;
5. a degree-3 polynomial (numpy.polyfit) is fitted per method over the bin
   centres with a value.

The range stops where refinement becomes full: pixels with A + l >= 1 are
refined at every step, so by default bins cover [0, 1 - l) with l from the
option file (the supplement stops at ~0.6, i.e. l = 0.4); ``--range LO HI``
sets it explicitly. Writes ``lpips_per_attention_bin.png`` and ``.csv``.
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def bin_edges(lo: float, hi: float, width: float) -> np.ndarray:
    """Edges lo, lo + w, ..., hi (the last bin may be narrower if w does not divide hi - lo)."""
    if not 0 <= lo < hi <= 1 or width <= 0:
        raise ValueError(f'need 0 <= lo < hi <= 1 and width > 0, got lo={lo}, hi={hi}, width={width}')
    n = int(np.ceil((hi - lo) / width - 1e-9))
    edges = lo + width * np.arange(n + 1)
    edges[-1] = hi
    return np.round(edges, 10)


def bin_masks(attention: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n_bins, H, W) bool: attention in [edges[i], edges[i+1]); the last bin includes 1.0 when hi == 1."""
    a = np.asarray(attention, np.float64)
    masks = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        upper = (a <= hi) if (i == len(edges) - 2 and hi >= 1.0) else (a < hi)
        masks.append((a >= lo) & upper)
    return np.stack(masks)


def lpips_per_bin(hr: np.ndarray, outputs: dict, attention: np.ndarray, edges: np.ndarray, model,
                  chunk: int = 16) -> dict:
    """label -> (n_bins,) LPIPS between masked HR and masked output; NaN for bins without pixels.

    ``hr`` and outputs are RGB float (H, W, 3) in [0, 1]; ``attention`` (H, W) on the same grid.
    """
    from yoda_plugin.metrics.lpips_metric import lpips_tensor
    hr = np.asarray(hr, np.float32)
    if attention.shape != hr.shape[:2]:
        raise ValueError(f'attention {attention.shape} and HR {hr.shape[:2]} differ in size')
    masks = bin_masks(attention, edges)
    nonempty = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    m = torch.from_numpy(masks[nonempty].astype(np.float32))[:, None]  # (n, 1, H, W)
    hr_t = torch.from_numpy(hr.transpose(2, 0, 1).copy())[None]
    out = {}
    for label, img in outputs.items():
        img = np.asarray(img, np.float32)
        if img.shape != hr.shape:
            raise ValueError(f'{label}: output {img.shape} and HR {hr.shape} differ in size')
        img_t = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
        values = np.full(len(masks), np.nan)
        for s in range(0, len(nonempty), chunk):
            mm = m[s:s + chunk]
            values[nonempty[s:s + chunk]] = lpips_tensor(hr_t * mm, img_t * mm, model).numpy()
        out[label] = values
    return out


def fit_curve(centres: np.ndarray, values: np.ndarray, degree: int = 3):
    """numpy.polyfit over the bins with a value; the degree drops if there are too few of them; None if < 2."""
    ok = np.isfinite(values)
    if ok.sum() < 2:
        return None
    return np.polyfit(centres[ok], values[ok], min(degree, int(ok.sum()) - 1))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sr', action='append', default=[], metavar='[LABEL=]DIR', help='result folder (repeatable)')
    p.add_argument('--opt', help='test option file: dataset (HR, LR, attention) and yoda.lower_bound')
    p.add_argument('--dataset', help='dataset section or name in the options')
    p.add_argument('--hr', help='HR images (folder or LMDB), overrides the options')
    p.add_argument('--lr', help='LR images (folder or LMDB), overrides the options')
    p.add_argument('--attention', help='attention LMDB, overrides the options')
    p.add_argument('--scale', type=int, help='SR scale (default: the options\')')
    p.add_argument('--suffix', help='SR file suffix (default: detected)')
    p.add_argument('--no-bicubic', action='store_true', help='leave out the bicubic baseline')
    p.add_argument('--bin-width', type=float, default=0.01)
    p.add_argument('--range', nargs=2, type=float, metavar=('LO', 'HI'),
                   help='attention range (default: 0 to 1 - l, where refinement becomes full)')
    p.add_argument('--lower-bound', type=float, help='l (default: the options\' yoda.lower_bound, else 0.4)')
    p.add_argument('--degree', type=int, default=3)
    p.add_argument('--max-images', type=int)
    p.add_argument('--lpips-weights', help='torchvision alexnet-owt-7be5be79.pth (else $YODA_LPIPS_ALEXNET, hub)')
    p.add_argument('--lpips-lin-weights', help='LPIPS linear layers (default: shipped with the lpips package)')
    p.add_argument('--device', default=None)
    p.add_argument('--out', required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from yoda_plugin.metrics.lpips_metric import get_lpips_model
    if not args.sr and args.no_bicubic:
        raise SystemExit('nothing to compare: give --sr and/or keep the bicubic baseline')
    opt = common.load_options(args.opt) if args.opt else {}
    lb = common.yoda_timing(opt, args.lower_bound)[0]
    lo, hi = args.range if args.range else (0.0, 1.0 - lb)
    edges = bin_edges(lo, hi, args.bin_width)
    centres = (edges[:-1] + edges[1:]) / 2
    dataset = common.build_dataset(args.opt, args.dataset, hr=args.hr, lr=args.lr, attention=args.attention,
                                   scale=args.scale, require_attention=True)
    runs = [common.label_and_path(s) for s in args.sr]
    names = common.result_names(dataset)
    found = [(label, common.find_sr_images(path, dataset.keys, args.suffix, names)) for label, path in runs]
    keys = [k for k in dataset.keys if all(k in f for _, f in found)][:args.max_images]
    if not keys:
        raise SystemExit('no image key has an SR image in every result folder')
    model = get_lpips_model('alex', args.lpips_weights, args.lpips_lin_weights, args.device)
    labels = [label for label, _ in found] + ([] if args.no_bicubic else ['bicubic'])
    per_image = {label: [] for label in labels}
    index = {k: i for i, k in enumerate(dataset.keys)}
    for key in keys:
        data = dataset[index[key]]
        hr = data['gt'].permute(1, 2, 0).numpy()
        outputs = {label: common.read_rgb(f[key]) for label, f in found}
        if not args.no_bicubic:
            outputs['bicubic'] = data['lq_up'].permute(1, 2, 0).numpy()
        for label, values in lpips_per_bin(hr, outputs, data['attention'][0].numpy(), edges, model).items():
            per_image[label].append(values)
    means, counts = {}, None
    for label in labels:
        stack = np.stack(per_image[label])
        counts = np.isfinite(stack).sum(0)
        with np.errstate(invalid='ignore'):
            means[label] = np.where(counts > 0, np.nansum(stack, 0) / np.maximum(counts, 1), np.nan)

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.linspace(edges[0], edges[-1], 200)
    for label in labels:
        pts, = ax.plot(centres, means[label], 'o', ms=3, alpha=0.5)
        coef = fit_curve(centres, means[label], args.degree)
        if coef is not None:
            ax.plot(xs, np.polyval(coef, xs), color=pts.get_color(), label=f'{label} (fit, degree {len(coef) - 1})')
            print(f'{label}: mean LPIPS over bins {np.nanmean(means[label]):.4f}; fit coefficients '
                  f'{", ".join(f"{c:.4g}" for c in coef)}')
        else:
            pts.set_label(label)
            print(f'{label}: too few bins with pixels for a fit')
    ax.set_xlabel('attention value (bin centre)')
    ax.set_ylabel('LPIPS (masked HR vs masked output)')
    ax.set_title(f'LPIPS per attention bin ({len(keys)} images, bin width {args.bin_width:g})')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    os.makedirs(args.out, exist_ok=True)
    common.save_figure(fig, os.path.join(args.out, 'lpips_per_attention_bin.png'))
    csv_path = os.path.join(args.out, 'lpips_per_attention_bin.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['bin_lo', 'bin_hi', 'images'] + labels)
        for i in range(len(centres)):
            w.writerow([f'{edges[i]:.4f}', f'{edges[i + 1]:.4f}', int(counts[i])] +
                       ['' if not np.isfinite(means[label][i]) else f'{means[label][i]:.6f}' for label in labels])
    print(f'wrote {csv_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
