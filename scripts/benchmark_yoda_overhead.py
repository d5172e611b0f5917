#!/usr/bin/env python
"""YODA's overhead versus vanilla SR3, measured side by side in one run.

    python scripts/benchmark_yoda_overhead.py [--net small|paper] [--size 128] [--batch 4] [--device cpu]

Prints one table:
* training step with YODA / without: the model's own step (``SR3Model.optimize_parameters``:
  forward, masked loss, backward, AdamW, EMA), same network, batch and data;
  interleaved A/B repetitions, medians;
* dense YODA sampling / vanilla sampling over the same number of steps;
* YODA's share of pixel updates for the attention maps used (what sparse
  sampling could save at most);
* sparse YODA sampling (``val.sparse``) in each ``--sparse MODE:MARGIN``
  variant: time / dense YODA time next to the share of pixel updates (the
  physical limit; the target is within 10% of it), the share of pixels the
  network evaluated, crops per step and the PSNR between sparse and dense
  output on the same noise;
* gradient checkpointing (``network_g.use_checkpoint``) training step / plain;
* fast paths (``train/val.amp: bf16``, ``channels_last``, with ``--compile``
  also ``torch.compile``): sampling forward and training step / float32;
* seconds per network forward of the chosen network at the chosen size.

Stages run in this order, each row printed as soon as it is measured: training
A/B, gradient checkpointing, (``--data-opt``) dataloader, forward, sampling
(dense and sparse, interleaved), fast paths. ``--quick`` skips gradient
checkpointing and the fast paths. A progress line per unit of work (stage, how
far, time elapsed, estimated time left) goes to stderr; the first line is the
plan: the network passes of each stage.
"""
import argparse
import os
import statistics
import sys
import time

import torch

try:
    import yoda_plugin  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yoda_plugin.apps.training_step import synthetic_batch, training_model  # noqa: E402
from yoda_plugin.core import (DDPMSampler, DiffusionSchedule, SparseDenoiser, YODAConfig, YODAMask,  # noqa: E402
                              make_beta_schedule, pixel_update_ratio, sample)
from yoda_plugin.utils.progress import Progress  # noqa: E402

NETS = {
    'paper': dict(base_channels=64, channel_mults=(1, 2, 4, 8, 8), num_res_blocks=3, attn_resolutions=(16, ),
                  norm_groups=32),
    'small': dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16, ),
                  norm_groups=8),
}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def model_options(args) -> dict:
    """The benchmarked SR3+YODA training model: the --net UNet at --size, the paper's schedule, optimizer and EMA."""
    return {'name': 'overhead', 'model_type': 'SR3Model', 'scale': 4,
            'network_g': {'type': 'SR3UNet', 'in_channels': 6, 'out_channels': 3, 'image_size': args.size,
                          **NETS[args.net]},
            'diffusion': {'schedule': 'linear', 'num_timesteps': 500, 'linear_start': 4e-6, 'linear_end': 4e-2},
            'yoda': {'enabled': True, 'lower_bound': args.lower_bound},
            'train': {'ema_decay': 0.9999, 'optim_g': {'type': 'AdamW', 'lr': 5e-5, 'weight_decay': 1e-4}}}


def fast_paths(opt, data, device, with_compile, repeats, seed=0, row=None):
    """{variant: (sampling forward s, training step s)}: float32, bf16 / fp16 autocast, channels_last (+ compile),
    each a model built with those ``train.*`` options; the step is its ``optimize_parameters``.

    ``row(name, forward, step, float32)`` is called for each variant as soon as its last repetition is timed
    (the last round runs float32 first); unavailable variants get ``(name, None, reason, None)``."""
    variants = {'float32': {}, 'bf16 autocast': {'amp': 'bf16'}, 'channels_last': {'channels_last': True},
                'channels_last + bf16': {'channels_last': True, 'amp': 'bf16'}}
    if device.type == 'cuda':  # on this project's CPU fp16 ran 274x (forward) / 92x (training step) slower
        variants.update({'fp16 autocast + GradScaler': {'amp': 'fp16'},
                         'channels_last + fp16': {'channels_last': True, 'amp': 'fp16'}})
    if with_compile:
        variants['torch.compile'] = {'compile': True}
    models, results, steps = {}, {}, {}
    z, c = data['gt'] * 2 - 1, data['lq_up'] * 2 - 1
    level = torch.full((z.shape[0], ), 0.5, device=device)

    def run(name, train):
        model = models[name]
        if train:
            steps[name] = steps.get(name, 0) + 1
            model.optimize_parameters(steps[name])
            return
        net, fast = model.get_bare_model(model.net_g), model.train_fast
        fmt = torch.channels_last if fast.channels_last else torch.contiguous_format
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=fast.amp_dtype or torch.float32,
                                             enabled=fast.amp_dtype is not None):
            net(z.contiguous(memory_format=fmt), c.contiguous(memory_format=fmt), level)
        net.train()

    times = {name: ([], []) for name in variants}
    progress = Progress(f'fast paths, {len(variants)} variants (warm-up, then {repeats} interleaved rounds)',
                        len(variants) * (1 + repeats), unit='x (1 forward + 1 training step)', prefix='overhead')
    for name in variants:  # building, warm-up (and compilation)
        try:
            torch.manual_seed(seed)  # the same weights in every variant
            models[name] = training_model(opt, device, **variants[name])
            models[name].feed_data(data)
            run(name, False)
            run(name, True)
        except Exception as err:  # e.g. no C++ compiler for inductor: report instead of failing the table
            results[name] = (None, f'unavailable: {type(err).__name__}: {str(err).splitlines()[0][:80]}')
        progress.update(detail=f'{name} warm-up')
    live = [n for n in variants if n not in results]
    progress.total = len(variants) + len(live) * repeats
    for i in range(repeats):
        last = i == repeats - 1
        for name in (live if i % 2 == 0 or last else live[::-1]):
            for j, train in enumerate((False, True)):
                sync(device)
                t = time.perf_counter()
                run(name, train)
                sync(device)
                times[name][j].append(time.perf_counter() - t)
            progress.update(detail=name)
            if last:
                results[name] = (statistics.median(times[name][0]), statistics.median(times[name][1]))
                if row is not None:
                    row(name, *results[name], results.get('float32', results[name]))
    progress.done()
    if row is not None:
        for name in variants:
            if name not in live:
                row(name, None, results[name][1], None)
    return {name: results[name] for name in variants}


def gaussian_attention(size, batch, device):
    """The centred Gaussian baseline of the paper (values spread over [0, 1]), (batch, 1, size, size)."""
    from yoda_plugin.attention import build_attention_source
    gauss = build_attention_source('gaussian')(torch.zeros(size, size, 3).numpy())
    return torch.from_numpy(gauss).to(device)[None, None].expand(batch, 1, -1, -1).contiguous()


def context_bound(att, lower_bound, timesteps, num_timesteps, margin, block):
    """Evaluated share for an ideal sparse network: every block of ``block`` px within ``margin`` px of an
    active pixel, no crop edges (what per-layer sparse convolutions could reach at most), mean over steps."""
    total = 0.0
    yoda_mask = YODAMask(att, lower_bound, num_timesteps)
    for t in timesteps[1:].tolist():  # the steps a sampler takes
        mask = yoda_mask.at(t)
        if margin:
            mask = torch.nn.functional.max_pool2d(mask, 2 * margin + 1, 1, margin)
        total += float(torch.nn.functional.max_pool2d(mask, block, block, ceil_mode=True).mean())
    return total / (len(timesteps) - 1)


def coverage_table(args):
    """Evaluated-pixel share of each sparse variant per image size, from the masks alone."""
    schedule_train = DiffusionSchedule(make_beta_schedule('linear', 500, 4e-6, 4e-2))
    schedule = schedule_train.respace(args.sample_steps)
    multiple = 2**(len(NETS[args.net]['channel_mults']) - 1)
    margins = sorted({int(spec.partition(':')[2] or 0) for spec in args.sparse})
    print(f'\nShare of the dense network pixels that sparse sampling evaluates (Gaussian maps, l={args.lower_bound}, '
          f'{args.sample_steps} steps, {args.net} UNet factor {multiple}, region_cost {args.region_cost:g}, '
          f'max_fraction 0.9); in brackets: / YODA\'s share of pixel updates (target <= 1.1). bound:M is the least '
          f'any method evaluates that gives each active pixel M px of context at {multiple}-px blocks')
    columns = list(args.sparse) + [f'bound:{m}' for m in margins]
    print('| HR size | YODA share | ' + ' | '.join(columns) + ' |')
    print('| --- ' * (len(columns) + 2) + '|', flush=True)
    # Per-step overhead dominates the mask work (measured: a 512 px cell is no slower than a 128 px one): count cells.
    progress = Progress(f'coverage, {len(args.coverage)} sizes x {len(args.sparse)} variants + {len(margins)} bounds '
                        f'({args.sample_steps} steps each)', len(args.coverage) * len(columns), unit='cells',
                        prefix='overhead')
    for size in args.coverage:
        att = gaussian_attention(size, 1, torch.device('cpu'))
        share = float(pixel_update_ratio(att, args.lower_bound, schedule.timesteps, 500).mean())
        cells = []
        for spec in args.sparse:
            mode, _, margin = spec.partition(':')
            fn = SparseDenoiser(lambda z, k, box: torch.zeros_like(z), int(margin or 0), multiple, 0.9, mode,
                                region_cost=args.region_cost)
            x = torch.zeros(1, 3, size, size)
            sampler = YODAConfig(lower_bound=args.lower_bound).wrap(DDPMSampler(schedule_train, args.sample_steps),
                                                                    att, x)
            sample(fn, sampler, x, torch.Generator().manual_seed(0))
            evaluated = fn.stats['pixels'] / fn.stats['dense_pixels']
            cells.append(f'{evaluated:.3f} ({evaluated / share:.2f})')
            progress.update(detail=f'{size} px, {spec}')
        for margin in margins:
            bound = context_bound(att, args.lower_bound, schedule.timesteps, 500, margin, multiple)
            cells.append(f'{bound:.3f} ({bound / share:.2f})')
            progress.update(detail=f'{size} px, bound:{margin}')
        print(f'| {size} | {share:.3f} | ' + ' | '.join(cells) + ' |', flush=True)
    progress.done()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--net', choices=sorted(NETS), default='small')
    p.add_argument('--size', type=int, default=64, help='HR size (SR3 diffuses on the HR grid)')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--repeats', type=int, default=10, help='A/B pairs of training steps')
    p.add_argument('--sample-steps', type=int, default=20)
    p.add_argument('--full-steps', type=int, default=200, help='T_eval of the paper options, for the s/image row')
    p.add_argument('--lower-bound', type=float, default=0.4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--sparse', nargs='+', default=['bbox:16', 'regions:16', 'regions:0'],
                   help='sparse sampling variants MODE:MARGIN (modes: bbox, regions)')
    p.add_argument('--region-cost', type=float, default=1024, help='val.sparse.region_cost of the regions mode')
    p.add_argument('--quick', action='store_true',
                   help='skip the gradient checkpointing and fast-path stages (more than half the time of a paper-UNet '
                        'run with few sampling steps): the overhead rows and the sparse table only')
    p.add_argument('--compile', action='store_true', help='also time torch.compile (compiles first: minutes)')
    p.add_argument('--coverage', type=int, nargs='+', metavar='SIZE',
                   help='only print the share of network pixels each --sparse variant evaluates for Gaussian maps '
                        'of these HR sizes (masks only, no network: seconds)')
    p.add_argument('--data-opt', help='an option file whose datasets.train to time (samples/s of LMDB read, decode, '
                   'augment), e.g. options/demo/train_sr3_yoda_demo.yml after the demo built its data')
    p.add_argument('--checkpoint', help='net_g_*.pth whose params_ema fit --net (e.g. the demo model with '
                   '--net small --size 64) to measure the sparse approximation on trained weights')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.coverage:
        return coverage_table(args)

    opt = model_options(args)
    schedule = DiffusionSchedule(make_beta_schedule('linear', 500, 4e-6, 4e-2))
    sample_schedule = schedule.respace(args.sample_steps)
    data = synthetic_batch(opt, args.batch, device, seed=args.seed)
    hr, cond = data['gt'] * 2 - 1, data['lq_up'] * 2 - 1  # image space: the network's input and condition
    att = gaussian_attention(args.size, args.batch, device)
    data['attention'] = att
    yoda, vanilla = YODAConfig(lower_bound=args.lower_bound), YODAConfig(enabled=False)
    multiple = 2**(len(NETS[args.net]['channel_mults']) - 1)
    variants = {'vanilla': 'dense', 'yoda': 'dense'}
    for spec in args.sparse:
        mode, _, margin = spec.partition(':')
        variants[f'sparse {spec}'] = (mode, int(margin or 0))
    ckpt_rounds, fast_repeats = max(2, args.repeats // 2), max(3, args.repeats // 2)
    n_fast = 4 + 2 * (device.type == 'cuda') + bool(args.compile)
    if args.quick:
        ckpt_rounds = n_fast = 0

    torch.manual_seed(args.seed)
    model = training_model(opt, device)  # SR3Model: the training step timed below is its optimize_parameters
    model.feed_data(data)
    net = model.get_bare_model(model.net_g)
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(ckpt.get('params_ema', ckpt.get('params')))
    params = sum(p.numel() for p in net.parameters()) / 1e6
    # What each stage costs in passes of the network (the progress lines below count them as they go).
    stages = [f'training A/B {2 + 2 * args.repeats} steps']
    if not args.quick:
        stages.append(f'gradient checkpointing {2 * ckpt_rounds} steps')
    stages += ['network forward 5 at batch 1', f'sampling 3 x {len(variants)} variants x {args.sample_steps} steps = '
               f'{3 * len(variants) * args.sample_steps} network calls']
    if not args.quick:
        stages.append(f'fast paths {n_fast} variants x {1 + fast_repeats} x (1 forward + 1 step)')
    print(f'[overhead] plan ({args.net} UNet {params:.1f}M params, {args.size}px, batch {args.batch}): ' +
          '; '.join(stages) + ('; --quick: no gradient checkpointing or fast-path stages' if args.quick else ''),
          file=sys.stderr, flush=True)
    print(f'\nYODA overhead benchmark: {args.net} SR3 UNet ({params:.1f}M params), {args.size}x{args.size}, '
          f'batch {args.batch}, {device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}')
    print('| measurement | vanilla | YODA | YODA / vanilla |')
    print('| --- | --- | --- | --- |', flush=True)

    steps = [0]

    def train_step(cfg):
        model.yoda = cfg  # the yoda section: on (lower bound l) or off
        steps[0] += 1
        model.optimize_parameters(steps[0])

    progress = Progress('training step, vanilla / YODA (2 warm-up, then A/B pairs)', 2 + 2 * args.repeats,
                        prefix='overhead')
    for cfg in (vanilla, yoda):  # warm-up both paths
        train_step(cfg)
        progress.update()
    times = {'vanilla': [], 'yoda': []}
    for i in range(args.repeats):
        order = (('vanilla', vanilla), ('yoda', yoda)) if i % 2 == 0 else (('yoda', yoda), ('vanilla', vanilla))
        for name, cfg in order:
            sync(device)
            t = time.perf_counter()
            train_step(cfg)
            sync(device)
            times[name].append(time.perf_counter() - t)
            progress.update()
    progress.done()
    train_v, train_y = statistics.median(times['vanilla']), statistics.median(times['yoda'])
    print(f'| training step, s (median of {args.repeats}) | {train_v:.4f} | {train_y:.4f} | {train_y / train_v:.3f} |',
          flush=True)

    # Gradient checkpointing: the same training step with every block recomputed in backward.
    def set_checkpoint(on):
        net.use_checkpoint = on
        for m in net.modules():
            if hasattr(m, 'use_checkpoint'):
                m.use_checkpoint = on

    ckpt_times = {'plain': [], 'checkpoint': []}
    net.train()
    progress = None if args.quick else Progress('gradient checkpointing / plain training step', 2 * ckpt_rounds,
                                                prefix='overhead')
    for i in range(ckpt_rounds):  # none with --quick
        for name in (('plain', 'checkpoint') if i % 2 == 0 else ('checkpoint', 'plain')):
            set_checkpoint(name == 'checkpoint')
            sync(device)
            t = time.perf_counter()
            train_step(yoda)
            sync(device)
            ckpt_times[name].append(time.perf_counter() - t)
            progress.update(detail=name)
    set_checkpoint(False)  # the stages below time the plain network
    if not args.quick:
        progress.done()
        ckpt_ratio = statistics.median(ckpt_times['checkpoint'][1:]) / statistics.median(ckpt_times['plain'][1:])
        print(f'| gradient checkpointing training step / plain (median of {len(ckpt_times["plain"]) - 1}) | | | '
              f'{ckpt_ratio:.3f} |', flush=True)

    if args.data_opt:
        from basicsr.data import build_dataset

        from yoda_plugin.utils.options import load_options
        data_opt = load_options(args.data_opt)
        ds_opt = dict(data_opt['datasets']['train'], phase='train', scale=data_opt['scale'])
        dataset = build_dataset(ds_opt)
        n = min(len(dataset) * 4, 256)
        dataset[0]
        progress = Progress(f'dataloader ({args.data_opt})', n, unit='samples', prefix='overhead')
        t = time.perf_counter()
        for i in range(n):
            dataset[i % len(dataset)]
            if (i + 1) % 64 == 0 or i + 1 == n:
                progress.update(64 if (i + 1) % 64 == 0 else n % 64)
        data_rate = n / (time.perf_counter() - t)
        progress.done()
        need = args.batch / train_y
        print(f'| dataloader samples/s, one process ({args.data_opt}) | | {data_rate:.1f} | '
              f'{data_rate / need:.1f}x the {need:.1f} samples/s training consumes |', flush=True)

    net.eval()
    with torch.no_grad():
        progress = Progress('network forward, batch 1', 5, unit='forwards', prefix='overhead')
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            net(hr[:1], cond[:1], torch.full((1, ), 0.5, device=device))
            progress.update()
        sync(device)
        forward = (time.perf_counter() - t) / 5
        progress.done()
    print(f'| network forward, batch 1, s | {forward:.4f} | | |', flush=True)

    def denoise(z_in, k, mask=None):
        return net(z_in, cond, sample_schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1))

    def net_fn(z_in, k, box):
        c = cond if box is None else cond[..., box[0]:box[1], box[2]:box[3]]
        return net(z_in, c, sample_schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1))

    sample_times = {name: [] for name in variants}
    outputs, sparse_stats = {}, {}
    progress = Progress(f'sampling, {len(variants)} variants x 3 rounds (interleaved)', 3 * len(variants),
                        unit=f'runs of {args.sample_steps} steps', prefix='overhead')
    with torch.no_grad():
        for i in range(3):
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]
            for name in order:
                sparse = variants[name]
                fn, cfg = (denoise, vanilla if name == 'vanilla' else yoda)
                if sparse != 'dense':
                    fn = SparseDenoiser(net_fn, sparse[1], multiple, 0.9, sparse[0], region_cost=args.region_cost)
                sync(device)
                t = time.perf_counter()
                outputs[name] = sample(fn, cfg.wrap(DDPMSampler(schedule, args.sample_steps), att, cond), cond,
                                       torch.Generator(device).manual_seed(0))
                sync(device)
                sample_times[name].append(time.perf_counter() - t)
                if sparse != 'dense':
                    sparse_stats[name] = fn.stats
                progress.update(detail=f'{name} {sample_times[name][-1]:.2f} s')
    progress.done()
    sample_med = {name: statistics.median(v) for name, v in sample_times.items()}
    samp_v, samp_y = sample_med['vanilla'], sample_med['yoda']

    def psnr(a, b):
        mse = float(((a - b) / 2).pow(2).mean())  # images in [-1, 1] -> [0, 1]
        return float('inf') if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()

    share = float(pixel_update_ratio(att, args.lower_bound, sample_schedule.timesteps, 500).mean())
    print(f'| dense sampling, {args.sample_steps} steps, s (median of 3) | {samp_v:.3f} | {samp_y:.3f} | '
          f'{samp_y / samp_v:.3f} |')
    per_image = args.full_steps / args.sample_steps / args.batch
    print(f'| full sampling, {args.full_steps} steps, s per image (from the {args.sample_steps}-step time) | '
          f'{samp_v * per_image:.2f} | {samp_y * per_image:.2f} | {samp_y / samp_v:.3f} |')
    print(f'| pixel updates (share of full diffusion), l={args.lower_bound} | 1.000 | {share:.3f} | {share:.3f} |')
    print(f'\nSparse YODA sampling, {args.sample_steps} steps; dense YODA {samp_y:.3f} s; YODA\'s share of pixel '
          f'updates {share:.3f} (the physical limit; target: sparse/dense <= {1.1 * share:.3f}); '
          f'region_cost {args.region_cost:g} px{"; random weights" if not args.checkpoint else ""}')
    print('| variant (mode:margin) | s (median of 3) | sparse / dense time | pixels evaluated | crops per step | '
          '/ share | PSNR vs dense, dB |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name in variants:
        if not name.startswith('sparse'):
            continue
        st = sparse_stats[name]
        ratio = sample_med[name] / samp_y
        evaluated = st['pixels'] / st['dense_pixels']
        crops = (st['crops'] + st['calls'] - st['cropped_calls']) / max(1, st['calls'])
        print(f'| {name[7:]} | {sample_med[name]:.3f} | {ratio:.3f} | {evaluated:.3f} | {crops:.2f} | '
              f'{ratio / share:.3f} | {psnr(outputs[name], outputs["yoda"]):.2f} |')
    sys.stdout.flush()
    if args.quick:
        return 0

    print(f'\nFast paths ({device.type}, batch {args.batch}, medians of {fast_repeats}; options '
          f'train/val.amp, train/val.channels_last, train/val.compile)')
    print('| variant | sampling forward, s | / float32 | training step, s | / float32 |')
    print('| --- | --- | --- | --- | --- |', flush=True)

    def fast_row(name, fwd, step, base):
        if fwd is None:
            print(f'| {name} | {step} | | | |', flush=True)
        else:
            print(f'| {name} | {fwd:.4f} | {fwd / base[0]:.3f} | {step:.4f} | {step / base[1]:.3f} |', flush=True)

    fast_paths(opt, data, device, args.compile, fast_repeats, args.seed, row=fast_row)
    return 0

if __name__ == '__main__':
    sys.exit(main())
