#!/usr/bin/env python
"""How good is a trained SR3 network's one-step x0 estimate at each noise level, with and without its LR condition?

    python scripts/analysis/denoiser_by_noise_level.py --opt options/demo/test_sr3_demo.yml \\
        --checkpoint yoda_plugin/weights/demo_sr3_x4.pth --hr-dir datasets/demo/val_hr --lr-dir datasets/demo/val_lr

For each training time step k of a grid, every HR image is noised to z_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps
(Eq. 3), the network predicts eps (or v, converted to eps) from (z_k, up(LR)) and the x0 estimate (z_k - sqrt(1 - abar_k) eps_hat) /
sqrt(abar_k), clipped to [-1, 1], is compared with HR (PSNR, RGB). The same with the condition replaced by zeros
shows how much the network uses the LR image at that level. A converged network's estimate approaches the
conditional mean (about bicubic quality) at high noise; an under-trained one collapses there, which is where
sampling from pure noise goes wrong (docs/convergence.md).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (repository on sys.path, yoda_plugin imported)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--opt', required=True, help='an SR3 option file (network_g, diffusion)')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--hr-dir', required=True)
    p.add_argument('--lr-dir', required=True)
    p.add_argument('--steps', type=int, nargs='+', default=[25, 100, 200, 300, 400, 475, 500],
                   help='training time steps k to probe')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from yoda_plugin.core.schedule import schedule_from_options
    from yoda_plugin.data.transforms import bicubic_resize
    from yoda_plugin.inference import YODAResolver
    from yoda_plugin.utils.options import load_options
    opt = load_options(args.opt)
    if opt.get('model_type') != 'SR3Model':
        p.error(f'--opt {args.opt}: model_type {opt.get("model_type")!r}, expected SR3Model')
    schedule = schedule_from_options(opt['diffusion'])
    bad = [k for k in args.steps if not 1 <= k <= schedule.num_steps]
    if bad:
        p.error(f'--steps {bad}: expected 1..{schedule.num_steps} (diffusion.num_timesteps)')
    pipeline = YODAResolver.from_options(opt, checkpoint=args.checkpoint, device='cpu').pipeline
    net, prediction = pipeline.net, pipeline.sampler.schedule.prediction  # eps or v: the checkpoint's
    import cv2
    names = sorted(n for n in os.listdir(args.hr_dir) if n.lower().endswith(common.IMAGE_EXTENSIONS))
    missing = [n for n in names if not os.path.isfile(os.path.join(args.lr_dir, n))]
    if missing:
        p.error(f'--lr-dir {args.lr_dir} lacks {missing[:3]} (LR images named as their HR images)')
    pairs = [(cv2.imread(os.path.join(args.hr_dir, n))[:, :, ::-1].copy(),
              cv2.imread(os.path.join(args.lr_dir, n))[:, :, ::-1].copy()) for n in names]
    if not pairs:
        p.error(f'no images in {args.hr_dir}')
    hr = torch.stack([torch.from_numpy(h.transpose(2, 0, 1).copy()) for h, _ in pairs]).float() / 127.5 - 1
    up = torch.stack([torch.from_numpy(bicubic_resize(lr, h.shape[:2], 'pil').transpose(2, 0, 1).copy())
                      for h, lr in pairs]).float() / 127.5 - 1

    def psnr(a, b):
        return float((10 * torch.log10(4.0 / ((a - b)**2).mean(dim=(1, 2, 3)))).mean())

    generator = torch.Generator().manual_seed(args.seed)
    print(f'{len(pairs)} images; bicubic PSNR {psnr(up, hr):.2f} dB; the network predicts {prediction}')
    print(f'{"k":>5} {"sqrt(abar)":>11} {"x0 PSNR":>9} {"no LR":>9}')
    for k in args.steps:
        abar = float(schedule.alphas_cumprod[k])
        z = abar**0.5 * hr + (1 - abar)**0.5 * torch.randn(hr.shape, generator=generator)
        level = torch.full((hr.shape[0], ), abar**0.5)
        row = []
        for cond in (up, torch.zeros_like(up)):
            with torch.no_grad():
                eps = pipeline.sampler.schedule.noise_from_output(net(z, cond, level), z, level)
            row.append(psnr(((z - (1 - abar)**0.5 * eps) / abar**0.5).clamp(-1, 1), hr))
        print(f'{k:>5} {abar**0.5:>11.4f} {row[0]:>9.2f} {row[1]:>9.2f}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
