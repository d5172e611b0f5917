#!/usr/bin/env python
"""Super-resolve LR images with a trained SR3 (+ YODA) checkpoint; attention maps computed on the fly.

    python scripts/inference_yoda.py INPUT --output OUT_DIR --opt options/test_sr3_yoda.yml \
        --checkpoint experiments/train_SR3_YODA_16_128_FFHQ/models/net_g_latest.pth [--param-key params_ema] \
        [--source dino_resnet50 --source-opt heads=max --source-opt weights=/path/dino_resnet50_pretrain.pth] \
        [--seed 0] [--device cuda] [--tile 128 --tile-overlap 32] [--save-previews]

INPUT is an image file or a folder (every regular, non-hidden file in it is
tried, sorted). Each LR image is upsampled (bicubic, the option file's dataset
``resize`` mode) to the HR grid, its attention map is computed on the LR image
with ``--source`` (default: the source recorded in the option file's
``attention_meta``) and resized bilinearly to the HR grid, exactly as the
training data were prepared; then the model samples (T_eval from the options,
``--sample-steps`` overrides). A vanilla model (YODA off) needs no attention.

Images larger than the training size (``network_g.image_size``, or ``--tile``)
are sampled with tiles on the HR grid (``--tile-overlap``, default a quarter
tile) through ``yoda_plugin.core.tiling.TiledDenoiser``: the diffusion state,
the YODA masks (from the attention map of the whole image) and the noise stay
global and only the network evaluation is split into overlapping, blended
tiles, so tiles cannot drift apart and memory stays bounded. SRDiff option
files use SRDiffModel's own tiled sampling with the same settings. Sides are
reflect-padded to the network's multiple and cropped back. Output: ``OUT_DIR/<stem>.png`` (size = LR size x
scale); ``--save-previews`` adds ``<stem>_attention.png`` (the HR-grid map) and
``<stem>_mask.png`` (share of sampling steps each pixel is refined at, Eq. 9:
white = every step). Unreadable or non-image files are reported and skipped;
the exit status is 1 if any input failed, 2 for setup errors.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'analysis'))

import common  # noqa: E402  (puts the repository on sys.path, imports yoda_plugin)

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


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); gray/RGBA/16-bit are converted as BasicSR's loader does. ValueError if unreadable."""
    with open(path, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8)
    img = None
    if data.size:
        try:
            img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None:
        raise ValueError('not a readable image (corrupt, truncated or another file type)')
    return np.ascontiguousarray(img[:, :, ::-1])


def parse_source_opts(pairs) -> dict:
    """``k=v`` pairs; values parsed as YAML scalars (numbers, true/false, null), else kept as strings."""
    import yaml
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition('=')
        if not sep or not key.strip():
            raise SetupError(f'--source-opt expects key=value, got {pair!r}')
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[key.strip()] = value if isinstance(value, (int, float, bool, type(None))) else text
    return out


def attention_source(args, opt, model):
    """The attention source: ``--source`` or the option file's ``attention_meta`` source; None if YODA is off."""
    from yoda_plugin.attention import ATTENTION_SOURCES, _init_parameters, build_attention_source
    if not model.yoda.enabled:
        if args.source:
            print(f'note: YODA is off in {args.opt}; --source {args.source} is ignored', file=sys.stderr)
        return None
    if args.source:
        config = {'name': args.source, **parse_source_opts(args.source_opt)}
    else:
        config = None
        for ds in (opt.get('datasets') or {}).values():
            src = ((ds or {}).get('attention_meta') or {}).get('source')
            if src:
                config = {**dict(src), **parse_source_opts(args.source_opt)}
                break
        if config is None:
            raise SetupError('YODA is on but no attention source is known: pass --source (e.g. edge, dino_resnet50)')
    name = config.pop('name')
    if name not in ATTENTION_SOURCES:
        raise SetupError(f'unknown attention source {name!r}; known: {", ".join(sorted(ATTENTION_SOURCES))}')
    params = {p.name for p in _init_parameters(ATTENTION_SOURCES[name])}
    if 'device' in params and 'device' not in config:
        config['device'] = args.device
    try:
        return build_attention_source(name, **config)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise SetupError(f'cannot build attention source {name!r}: {err}') from err


# ----------------------------------------------------------------------------------------------- sampling

def size_multiple(model) -> int:
    """Sides of the network input must be multiples of this (SRDiff: its ``align``; SR3: 2**(levels - 1))."""
    if hasattr(model, 'align'):
        return int(model.align)
    net = model.get_bare_model(model.net_g)
    return 2 ** (getattr(net, 'num_levels', 1) - 1)


def _pad(x: torch.Tensor, bottom: int, right: int, mode: str) -> torch.Tensor:
    if bottom == 0 and right == 0:
        return x
    if mode == 'reflect' and (bottom >= x.shape[-2] or right >= x.shape[-1]):
        mode = 'replicate'  # reflection needs the pad to be smaller than the side
    return torch.nn.functional.pad(x, (0, right, 0, bottom), mode=mode)


@torch.no_grad()
def sample_sr3_tiled(model, tile: int, overlap: int, seed: int, sparse: dict = None) -> torch.Tensor:
    """SR3Model.sample for the fed image, with the network evaluated in blended tiles.

    yoda_plugin.core.tiling.TiledDenoiser keeps the state z_t, the YODA masks and the noise global and only
    splits the network evaluation, so tiles never drift apart. Sides are reflect-padded to the network's
    multiple (the attention map replicate-padded) and cropped back. ``sparse`` (val.sparse options, enabled)
    evaluates only crops around the active pixels, each tiled the same way.
    """
    from yoda_plugin.core import sample_loop
    from yoda_plugin.core.tiling import tiled_net_fn
    multiple = size_multiple(model)
    H, W = model.lq_up.shape[2:]
    Hp, Wp = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    cond = _pad(model.lq_up, Hp - H, Wp - W, 'reflect') * 2 - 1
    att = model.attention
    if att is not None:
        att = _pad(att, Hp - H, Wp - W, 'replicate')
    net = model._sampling_net()
    net.eval()
    schedule = model.sample_schedule

    def denoise_tile(z_in, k, box):
        top, bottom, left, right = box
        noise_level = schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1)
        return net(z_in, cond[..., top:bottom, left:right], noise_level)  # SR3's conditioning, as SR3Model

    denoise = tiled = tiled_net_fn(denoise_tile, Hp, Wp, tile or None, overlap, None, multiple)
    use_sparse = bool(sparse and sparse.get('enabled') and model.yoda.enabled and att is not None)
    model.sparse_stats = None
    if use_sparse:
        model.opt.setdefault('val', {})['sparse'] = sparse
        denoise = model.sparse_denoiser(denoise, model.sparse_options(), multiple)  # defaults filled, checked
    generator = torch.Generator(device=model.device)
    generator.manual_seed(int(seed))
    clip = (-1.0, 1.0) if model.diffusion_opt['clip_denoised'] else None
    z = sample_loop(denoise, schedule, cond, att if model.yoda.enabled else None, model.yoda, generator, clip,
                    model.diffusion_opt['variance'], pass_mask=use_sparse)
    return ((z[:, :, :H, :W] + 1) / 2).clamp(0, 1), tiled.num_tiles


@torch.no_grad()
def super_resolve(model, lr: np.ndarray, att_lr, scale: int, tile: int, overlap: int, seed: int, resize: str,
                  sparse: dict = None):
    """SR image (H, W, 3) float in [0, 1], the HR-grid attention (or None) and the number of tiles."""
    from yoda_plugin.data.transforms import bicubic_resize, resize_attention
    H, W = lr.shape[0] * scale, lr.shape[1] * scale
    up = bicubic_resize(lr, (H, W), resize)
    data = {'lq': torch.from_numpy(lr.transpose(2, 0, 1).copy()).float()[None] / 255.0,
            'lq_up': torch.from_numpy(up.transpose(2, 0, 1).copy()).float()[None] / 255.0}
    att = None
    if att_lr is not None:
        att = resize_attention(att_lr.astype(np.float32), (H, W))
        data['attention'] = torch.from_numpy(att)[None, None]
    model.feed_data(data)
    if hasattr(model, 'tile_opt'):  # models with their own tiled sampling (SRDiffModel)
        from yoda_plugin.core.tiling import TiledDenoiser, check_tiling
        if tile:
            size, ov, margin = check_tiling(tile, overlap, None, model.align, where='--tile')
            model.tile_opt.update(tile_size=size, tile_overlap=ov, tile_margin=margin)
        if sparse:
            model.opt.setdefault('val', {})['sparse'] = sparse
        out = model.sample(seed=seed)
        m = model.align
        n_tiles = TiledDenoiser(None, -(-H // m) * m, -(-W // m) * m, model.tile_opt['tile_size'],
                                model.tile_opt['tile_overlap'], model.tile_opt['tile_margin'], m).num_tiles
    else:
        out, n_tiles = sample_sr3_tiled(model, tile, overlap, seed, sparse)
    return out[0].cpu().numpy().transpose(1, 2, 0).astype(np.float64), att, n_tiles


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def refinement_share(model, att_hr: np.ndarray) -> np.ndarray:
    """Share of sampling steps each pixel is refined at (Eq. 9 on the sampling grid)."""
    from yoda_plugin.core import diffused_steps_per_pixel
    s = model.sample_schedule
    steps = diffused_steps_per_pixel(torch.from_numpy(att_hr)[None, None], model.yoda.lower_bound, s.timesteps,
                                     s.num_train_timesteps)
    return steps[0, 0].double().numpy() / s.num_steps


# ----------------------------------------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='an LR image file or a folder of them')
    p.add_argument('--output', '-o', required=True, help='output folder')
    p.add_argument('--opt', required=True, help='option file of the model (train or test options)')
    p.add_argument('--checkpoint', help='net_g_*.pth (default: the options\' path.pretrain_network_g)')
    p.add_argument('--param-key', default='params_ema', choices=('params', 'params_ema'))
    p.add_argument('--source', help='attention source (gaussian, edge, sift, dino_vits8, dino_resnet50); default: '
                                    'the options\' attention_meta source')
    p.add_argument('--source-opt', action='append', default=[], metavar='KEY=VALUE',
                   help='attention source parameter (repeatable), e.g. heads=max, weights=/path/file.pth')
    p.add_argument('--seed', type=int, default=0, help='sampling seed (the same for every image)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--sample-steps', type=int, help='override T_eval')
    p.add_argument('--tile', type=int, help='HR tile size (default: network_g.image_size; 0: no tiling)')
    p.add_argument('--tile-overlap', type=int, help='HR pixels shared by neighbouring tiles (default: tile / 4, '
                                                    'a multiple of the network\'s size multiple)')
    p.add_argument('--sparse', type=common.parse_sparse_spec, metavar='MODE:MARGIN',
                   help='sparse YODA sampling (val.sparse): network only on crops around the active pixels, e.g. '
                        'regions:8 (an approximation: see README, Performance)')
    p.add_argument('--region-cost', type=float, default=1024, help='val.sparse.region_cost with --sparse regions:*')
    p.add_argument('--suffix', default='', help='appended to output file stems')
    p.add_argument('--save-previews', action='store_true', help='also write the attention map and mask preview')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = list_inputs(args.input)
        if not files:
            raise SetupError(f'no files in {args.input}')
        try:
            model, opt = common.build_sr_model(args.opt, args.checkpoint, args.param_key, args.device,
                                               args.sample_steps)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
            raise SetupError(str(err)) from err
        source = attention_source(args, opt, model)
        scale = int(opt['scale'])
        multiple = size_multiple(model)
        tile = (opt.get('network_g') or {}).get('image_size') if args.tile is None else args.tile
        tile = -(-int(tile) // multiple) * multiple if tile else 0  # rounded up to the network's multiple
        overlap = (tile // 4 // multiple * multiple if args.tile_overlap is None else args.tile_overlap) if tile else 0
        if tile:
            from yoda_plugin.core.tiling import check_tiling
            try:
                check_tiling(tile, overlap, None, multiple, where='--tile')
            except ValueError as err:
                raise SetupError(f'{err} (--tile {tile}, --tile-overlap {overlap})') from err
            if overlap == 0:
                raise SetupError('--tile-overlap must be > 0: neighbouring tiles are blended')
        sparse = None
        if args.sparse:
            sparse = {'enabled': True, 'mode': args.sparse[0], 'margin': args.sparse[1],
                      'region_cost': args.region_cost}
            model.opt.setdefault('val', {})['sparse'] = sparse
            try:
                sparse = model.sparse_options()  # with the defaults of the keys not given
            except ValueError as err:
                raise SetupError(str(err)) from err
        resize = next((ds.get('resize', 'pil') for ds in (opt.get('datasets') or {}).values() if ds), 'pil')
    except SetupError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    failed, written, used = [], [], set()
    from tqdm import tqdm
    bar = tqdm(files, unit='image', disable=args.quiet, file=sys.stderr)
    for path in bar:
        name = os.path.basename(path)
        bar.set_description(name[:30])
        stem = os.path.splitext(name)[0]
        if stem in used:
            stem = name  # a.png and a.jpg: keep both
        try:
            lr = read_image(path)
            start = time.perf_counter()
            att_lr = source(lr) if source is not None else None
            sr, att_hr, n_tiles = super_resolve(model, lr, att_lr, scale, tile, overlap, args.seed, resize, sparse)
            out = os.path.join(args.output, f'{stem}{args.suffix}.png')
            if not cv2.imwrite(out, to_uint8(sr)[:, :, ::-1]):
                raise OSError(f'cannot write {out}')
            if args.save_previews and att_hr is not None:
                cv2.imwrite(os.path.join(args.output, f'{stem}_attention.png'), to_uint8(att_hr))
                cv2.imwrite(os.path.join(args.output, f'{stem}_mask.png'), to_uint8(refinement_share(model, att_hr)))
            used.add(stem)
            written.append(out)
            stats = getattr(model, 'sparse_stats', None)
            share = f', network on {stats["pixels"] / max(1, stats["dense_pixels"]):.3f} of the pixels' if stats else ''
            bar.write(f'{name}: {lr.shape[1]}x{lr.shape[0]} -> {sr.shape[1]}x{sr.shape[0]}, {n_tiles} tile(s){share}, '
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
