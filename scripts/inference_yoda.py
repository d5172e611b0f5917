#!/usr/bin/env python
"""Super-resolve LR images with a trained SR3 or SRDiff (+ YODA) checkpoint; attention maps computed on the fly.

    python scripts/inference_yoda.py INPUT --output OUT_DIR --opt options/test_sr3_yoda.yml \
        --checkpoint experiments/train_SR3_YODA_16_128_FFHQ/models/net_g_latest.pth [--param-key params_ema] \
        [--sampler dpmpp_2m --steps 20] [--sparse regions:8] [--amp bf16] \
        [--source dino_resnet50 --source-opt heads=max --source-opt weights=/path/dino_resnet50_pretrain.pth] \
        [--seed 0] [--device cuda] [--tile 128 --tile-overlap 32] [--colour-fix wavelet] [--save-previews]

A thin front end of ``yoda_plugin.YODAResolver``: INPUT is an image file or a
folder (every regular, non-hidden file in it is tried, sorted). Each LR image
is upsampled (bicubic, the option file's dataset ``resize`` mode) to the HR
grid, its attention map is computed on the LR image with ``--source``
(default: the source recorded in the option file's ``attention_meta``) and
resized bilinearly to the HR grid, exactly as the training data were
prepared; then the resolver samples with ``--sampler`` / ``--steps`` (default:
the option file's ``val.sampler``, else DDPM with ``diffusion.sample_steps``).
A vanilla model (YODA off) needs no attention. ``--colour-fix wavelet|adain``
corrects each sampled image's colours against the upsampled LR (``none``
switches off the option file's ``val.colour_fix``).

Images larger than the training size (``network_g.image_size``, or ``--tile``)
are sampled with tiles on the HR grid (``--tile-overlap``, default a quarter
tile): the diffusion state, the YODA masks and the noise stay global and only
the network evaluation is split into overlapping, blended tiles. Sides are
reflect-padded to the network's multiple and cropped back. Output:
``OUT_DIR/<stem>.png`` (size = LR size x scale); ``--save-previews`` adds
``<stem>_attention.png`` (the HR-grid map) and ``<stem>_mask.png`` (share of
sampling steps each pixel is refined at, Eq. 9: white = every step). An
output that would overwrite an input is refused before anything runs.
Unreadable or non-image files are reported and skipped; the exit status is 1
if any input failed, 2 for setup errors.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'analysis'))

import common  # noqa: E402  (puts the repository on sys.path, imports yoda_plugin)
from yoda_plugin.data.image_io import read_image  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


class SetupError(Exception):
    pass


# ----------------------------------------------------------------------------------------------- inputs

def list_inputs(path: str):
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if not f.startswith('.') and os.path.isfile(os.path.join(path, f))]
    raise SetupError(f'input {path} does not exist')


# ----------------------------------------------------------------------------------------------- outputs

def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def planned_outputs(files, output: str, suffix: str, previews: bool):
    """input path -> the output paths it will write; refuse any that is an input (never overwrite a user's file)."""
    plans, used = {}, set()
    for path in files:
        name = os.path.basename(path)
        stem = os.path.splitext(name)[0]
        if stem in used:
            stem = name  # a.png and a.jpg: keep both
        used.add(stem)
        outs = [os.path.join(output, f'{stem}{suffix}.png')]
        if previews:
            outs += [os.path.join(output, f'{stem}_attention.png'), os.path.join(output, f'{stem}_mask.png')]
        plans[path] = outs
    inputs = {os.path.realpath(p) for p in files}
    clash = sorted(o for outs in plans.values() for o in outs if os.path.realpath(o) in inputs)
    if clash:
        raise SetupError(f'output {clash[0]} would overwrite an input image ({len(clash)} such file(s)); choose '
                         f'another --output folder or a --suffix')
    return plans


# ----------------------------------------------------------------------------------------------- main

def non_negative_int(text: str) -> int:
    """An argparse type: the flag's own name is in argparse's message (``argument --tile: ...``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer of HR pixels, got {text!r}') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0 (HR pixels; --tile 0: no tiling), got {value}')
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='an LR image file or a folder of them')
    p.add_argument('--output', '-o', required=True, help='output folder')
    p.add_argument('--opt', required=True, help='option file of the model (train or test options)')
    p.add_argument('--checkpoint', help="net_g_*.pth (default: the options' path.pretrain_network_g)")
    p.add_argument('--param-key', default='params_ema', choices=('params', 'params_ema'))
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='load a checkpoint that needs unsafe unpickling (weights_only=False); only for trusted files')
    p.add_argument('--source', help="attention source (gaussian, edge, sift, dino_vits8, dino_resnet50); default: "
                                    "the options' attention_meta source")
    p.add_argument('--source-opt', action='append', default=[], metavar='KEY=VALUE',
                   help='attention source parameter (repeatable), e.g. heads=max, weights=/path/file.pth')
    p.add_argument('--seed', type=int, default=0, help='sampling seed (the same for every image)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--sampler', choices=('ddpm', 'ddim', 'dpmpp_2m'),
                   help="val.sampler.type (default: the option file's val.sampler, else ddpm)")
    p.add_argument('--steps', '--sample-steps', dest='steps', type=int, help='number of sampling steps')
    p.add_argument('--eta', type=float, help='DDIM eta (with --sampler ddim)')
    p.add_argument('--tile', type=non_negative_int, help='HR tile size (default: network_g.image_size; 0: no tiling)')
    p.add_argument('--tile-overlap', type=non_negative_int,
                   help="HR pixels shared by neighbouring tiles (default: tile / 4, a multiple of the network's size "
                        "multiple)")
    p.add_argument('--sparse', type=common.parse_sparse_spec, metavar='MODE:MARGIN',
                   help='sparse YODA sampling (val.sparse): network only on crops around the active pixels, e.g. '
                        'regions:8 (an approximation: see README, Performance)')
    p.add_argument('--region-cost', type=float, default=1024, help='val.sparse.region_cost with --sparse regions:*')
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast dtype of the network (val.amp)')
    p.add_argument('--colour-fix', choices=('none', 'wavelet', 'adain'),
                   help="colour correction against the upsampled LR after sampling (val.colour_fix; default: the "
                        "option file's, else none)")
    p.add_argument('--suffix', default='', help='appended to output file stems')
    p.add_argument('--save-previews', action='store_true', help='also write the attention map and mask preview')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def build_resolver(args, opt):
    """The YODAResolver of the options with the command line's overrides."""
    from yoda_plugin import YODAResolver
    from yoda_plugin.attention import parse_source_opts
    from yoda_plugin.inference import attention_source_for
    val = opt.get('val') or {}
    sampler = dict(val.get('sampler') or {})
    if args.sampler:
        sampler = {'type': args.sampler}
    if args.steps is not None:
        sampler['steps'] = args.steps
    if args.eta is not None:
        sampler['eta'] = args.eta
    overrides = {'sampler': sampler}
    if args.sparse:
        overrides['sparse'] = {'enabled': True, 'mode': args.sparse[0], 'margin': args.sparse[1],
                               'region_cost': args.region_cost}
    if args.amp:
        overrides['amp'] = args.amp
    if args.colour_fix:
        overrides['colour_fix'] = args.colour_fix
    tile = (opt.get('network_g') or {}).get('image_size') if args.tile is None else args.tile
    if tile:
        overrides['tiling'] = {'tile_size': int(tile), 'tile_overlap': args.tile_overlap, 'round': True}
    elif args.tile == 0:
        overrides['tiling'] = {'tile_size': None}
    source = None
    if args.source or args.source_opt:
        source = attention_source_for(opt, args.device, args.source, parse_source_opts(args.source_opt))
    resolver = YODAResolver.from_options(opt, args.checkpoint, args.param_key, args.device, source,
                                         args.trust_checkpoint, **overrides)
    if not resolver.pipeline.yoda.enabled and args.source:
        print(f'note: YODA is off in {args.opt}; --source {args.source} is ignored', file=sys.stderr)
    return resolver


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = list_inputs(args.input)
        if not files:
            raise SetupError(f'no files in {args.input}')
        plans = planned_outputs(files, args.output, args.suffix, args.save_previews)
        try:
            opt = common.load_options(args.opt)
            resolver = build_resolver(args, opt)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as err:
            raise SetupError(str(err)) from err
    except SetupError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    failed, written = [], []
    pipe = resolver.pipeline
    from tqdm import tqdm
    bar = tqdm(files, unit='image', disable=args.quiet, file=sys.stderr)
    print(f'sampler {pipe.sampler_config.label(pipe.steps)}, YODA {"on" if pipe.yoda.enabled else "off"}, '
          f'tiles {pipe.tiling.tile_size or "off"}, colour fix {pipe.colour_fix or "off"}', file=sys.stderr)
    for path in bar:
        name = os.path.basename(path)
        bar.set_description(name[:30])
        try:
            lr = read_image(path)  # decoded as BasicSR's loader does
            start = time.perf_counter()
            sr = resolver(lr, seed=args.seed)
            out = plans[path][0]
            if not cv2.imwrite(out, sr[:, :, ::-1]):
                raise OSError(f'cannot write {out}')
            info = resolver.last_info
            att = info['attention']
            if args.save_previews and att is not None:
                att_hr = att[0, 0].cpu().numpy()
                cv2.imwrite(plans[path][1], to_uint8(att_hr))
                steps = pipe.yoda.mask(att, pipe.sampler.schedule.num_train_timesteps).steps_per_pixel(
                    pipe.sampler.schedule.timesteps)
                cv2.imwrite(plans[path][2], to_uint8(steps[0, 0].double().cpu().numpy() / pipe.steps))
            written.append(out)
            stats = info['sparse_stats']
            share = f', network on {stats["pixels"] / max(1, stats["dense_pixels"]):.3f} of the pixels' if stats else ''
            bar.write(f'{name}: {lr.shape[1]}x{lr.shape[0]} -> {sr.shape[1]}x{sr.shape[0]}, {info["tiles"]} tile(s)'
                      f'{share}, '
                      f'{time.perf_counter() - start:.1f} s -> {out}', file=sys.stderr)
        except Exception as err:  # one bad input must not stop the batch
            failed.append((path, f'{type(err).__name__}: {err}'))
            bar.write(f'skipped {path}: {type(err).__name__}: {err}', file=sys.stderr)
    bar.close()
    print(json.dumps({'written': len(written), 'failed': len(failed)}))
    if failed:
        print(f'{len(failed)} of {len(files)} input(s) failed:', file=sys.stderr)
        for path, reason in failed:
            print(f'  {path}: {reason}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
