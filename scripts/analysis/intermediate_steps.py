#!/usr/bin/env python
"""Supplement Fig. 8-9: intermediate states z_t of YODA's sampling and the binary masks M(t) at the same steps.

    python scripts/analysis/intermediate_steps.py --opt options/test_sr3_yoda.yml \
        --checkpoint experiments/train_SR3_YODA_16_128_FFHQ/models/net_g_latest.pth --num-images 3 --out figures/

Builds the model of the option file with the checkpoint (``--param-key``,
default ``params_ema``), takes images from the option file's test dataset
(``--dataset``, ``--keys``), samples with ``YODAResolver.sample_prepared(callback=...)`` and
keeps z_{k-1} (shown as (z + 1) / 2) and the mask M(t_k) of the step that
produced it at ``--steps`` evenly spaced sampling steps, ending at 0 (the
paper shows 189, 168, ..., 21, 0 of 200). Titles give the sampling step and,
in brackets, its training time step t (on which Eq. 9 is defined); the mask of
the step k that produced z_{k-1} is M(t_k). Writes
``<key>_states.png`` (states, then LR-up | SR | HR) and ``<key>_masks.png``
(white = refined) per image. A vanilla model (YODA off) shows all-white masks.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def capture_steps(num_steps: int, count: int):
    """Sampling-grid indices of the states to keep: ``count`` evenly spaced from K - 1 down to 0."""
    count = max(1, min(count, num_steps))
    if count == 1:
        return [0]
    return sorted({int(round((num_steps - 1) * (count - 1 - j) / (count - 1))) for j in range(count)}, reverse=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--opt', required=True, help='test option file (model, diffusion, dataset)')
    p.add_argument('--checkpoint', help='net_g_*.pth (default: the options\' path.pretrain_network_g)')
    p.add_argument('--param-key', default='params_ema', choices=('params', 'params_ema'))
    p.add_argument('--dataset', help='dataset section or name in the options (default: the first test/val)')
    p.add_argument('--keys', nargs='+', help='image keys (default: the first --num-images)')
    p.add_argument('--num-images', type=int, default=2)
    p.add_argument('--steps', type=int, default=10, help='states to show')
    p.add_argument('--sample-steps', type=int, help='override T_eval')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', required=True)
    return p


def _img(t: torch.Tensor) -> np.ndarray:
    t = t.detach().float().cpu().clamp(0, 1)
    return t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    resolver = common.build_resolver(args.opt, args.checkpoint, args.param_key, args.device, args.sample_steps)
    dataset = common.build_dataset(args.opt, args.dataset)
    index = {k: i for i, k in enumerate(dataset.keys)}
    keys = args.keys or dataset.keys[:args.num_images]
    missing = [k for k in keys if k not in index]
    if missing:
        raise SystemExit(f'keys not in the dataset: {missing}')
    schedule = resolver.pipeline.sampler.schedule
    K, ts = schedule.num_steps, schedule.timesteps.tolist()
    wanted = capture_steps(K, args.steps)
    plt = common.pyplot()
    os.makedirs(args.out, exist_ok=True)
    for n, key in enumerate(keys):
        data = dataset[index[key]]
        states, masks = {}, {}

        def callback(k, z, mask):
            if k - 1 in wanted:
                states[k - 1] = ((z[0] + 1) / 2).cpu()
                masks[k - 1] = mask[0].cpu() if mask is not None else torch.ones(1, *z.shape[2:])

        att = data['attention'][None] if 'attention' in data else None
        sr = resolver.sample_prepared(data['lq'][None], data['lq_up'][None], att, args.seed + n, callback)[0]
        cols = len(wanted)
        fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.6), squeeze=False)
        for j, s in enumerate(wanted):
            axes[0, j].imshow(_img(states[s]))
            axes[0, j].set_title(f'z_{s} (t={ts[s]})', fontsize=7)
        finals = [('LR (bicubic)', data['lq_up']), ('SR', sr)] + ([('HR', data['gt'])] if 'gt' in data else [])
        for j in range(cols):
            axes[1, j].axis('off')
            axes[0, j].axis('off')
        for j, (title, im) in enumerate(finals[:cols]):
            axes[1, j].imshow(_img(im))
            axes[1, j].set_title(title, fontsize=7)
        fig.suptitle(f'{key}: intermediate states z (sampling step of {K}, training time t)', fontsize=9)
        common.save_figure(fig, os.path.join(args.out, f'{key}_states.png'))
        fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols, 1.9), squeeze=False)
        for j, s in enumerate(wanted):
            m = _img(masks[s])
            axes[0, j].imshow(m, cmap='gray', vmin=0, vmax=1)
            axes[0, j].set_title(f'M(t={ts[s + 1]}): {100 * m.mean():.0f}%', fontsize=7)
            axes[0, j].axis('off')
        fig.suptitle(f'{key}: binary masks M(t) of the steps that produced the states above '
                     f'(white = refined; share of pixels)', fontsize=9)
        common.save_figure(fig, os.path.join(args.out, f'{key}_masks.png'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
