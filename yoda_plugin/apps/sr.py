"""Super-resolve your own images: ``python -m yoda_plugin sr INPUT -o OUT --checkpoint CKPT``.

    python -m yoda_plugin sr lr.png -o out --checkpoint yoda_plugin/weights/demo_sr3_yoda_x4.pth
    python -m yoda_plugin sr LR_DIR -o out --checkpoint experiments/NAME/models/net_g_latest.pth \
        [--sampler dpmpp_2m --steps 20] [--seed 0] [--device cuda] [--tile 128 --tile-overlap 32] \
        [--colour-fix wavelet] [--yoda off] [--sparse regions:8] [--save-previews] [--overwrite]
    python -m yoda_plugin sr LR_DIR -o out --opt options/test_sr3_yoda.yml --checkpoint old_net_g.pth

INPUT is an image file or a folder (every regular, non-hidden file in it is tried, sorted). A checkpoint the
project wrote (training's ``net_g_*.pth``, the demo's models in ``yoda_plugin/weights``,
``scripts/convert_checkpoint.py``'s output) records its options, so no option file is needed; ``--checkpoint
demo`` / ``demo-vanilla`` name the demo's shipped SR3 + YODA / SR3 models. ``--opt`` gives the option file
instead: an older checkpoint without a record needs it, and one that disagrees with a checkpoint's record on
what the weights were trained with is refused naming the keys.

Each LR image is upsampled with the dataset's bicubic (``resize``), its attention map computed on the LR image
with ``--source`` (default: the recorded one) and the model samples. Defaults are :class:`YODAResolver`'s
(:mod:`yoda_plugin.inference`, defined once): the recorded sampler and steps, seed 0, tiles of the training
size (``network_g.image_size``) for larger images, the recorded colour fix (else none). The same image,
checkpoint and seed give the same pixels here and through the API. Per image it prints the sampler, steps,
update share (YODA's share of full diffusion's pixel updates), tiles and seconds, and why sparse sampling ran
dense when it did. Output ``OUT/<stem>.png``; ``--save-previews`` adds ``<stem>_attention.png`` and
``<stem>_mask.png`` (the share of sampling steps each pixel is refined at: white = every step). Existing
outputs are never overwritten unless ``--overwrite``; an input never. Unreadable files are reported and
skipped: exit status 1 if any input failed, 2 for setup errors (one line ``error: ...``).
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights')
# ``--checkpoint NAME`` shortcuts for the demo's shipped converged models (docs/convergence.md).
SHIPPED = {'demo': 'demo_sr3_yoda_x4.pth', 'demo-vanilla': 'demo_sr3_x4.pth'}


class SetupError(Exception):
    pass


# -- inputs and outputs ------------------------------------------------------------------------------------------

def list_inputs(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if not f.startswith('.') and os.path.isfile(os.path.join(path, f))]
    raise SetupError(f'input {path} does not exist')


def planned_outputs(files, output: str, suffix: str, previews: bool, overwrite: bool = False) -> Dict[str, list]:
    """input path -> the output paths it will write. Refused: an output that is an input (always) or that exists
    (unless ``overwrite``)."""
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
    existing = sorted(o for outs in plans.values() for o in outs if os.path.exists(o))
    if existing and not overwrite:
        raise SetupError(f'output {existing[0]} exists ({len(existing)} of the outputs exist); pass --overwrite to '
                         f'replace them, or choose another --output folder or a --suffix')
    return plans


def to_uint8(img):
    import numpy as np
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# -- arguments ---------------------------------------------------------------------------------------------------

def int_at_least(minimum: int, expected: str, hint: str = ''):
    """An argparse type for integers >= ``minimum`` (argparse's message names the flag: ``argument --tile: ...``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be >= {minimum}{hint}, got {value}')
        return value
    return parse


non_negative_int = int_at_least(0, 'an integer of HR pixels', ' (HR pixels; --tile 0: no tiling)')
positive_int = int_at_least(1, 'a positive integer')


def parse_sparse_spec(spec: str):
    """``MODE:MARGIN`` (e.g. ``regions:8``) of sparse sampling, as (mode, margin); argparse type."""
    from yoda_plugin.core import SPARSE_MODES
    mode, sep, margin = spec.partition(':')
    if not sep or mode not in SPARSE_MODES or not margin.isdigit():
        raise argparse.ArgumentTypeError(f'sparse variant {spec!r}: expected MODE:MARGIN with MODE bbox or regions '
                                         f'and MARGIN an integer >= 0 (pixels), e.g. regions:8')
    return mode, int(margin)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from yoda_plugin.core.samplers import SAMPLERS
    from yoda_plugin.inference import DEFAULT_PARAM_KEY, DEFAULT_SEED
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', help='an LR image file or a folder of them')
    p.add_argument('--output', '-o', required=True, help='output folder')
    p.add_argument('--checkpoint', help="net_g_*.pth, a converted or shipped checkpoint (or 'demo', 'demo-vanilla': "
                                        "the demo's shipped models); default with --opt: its path.pretrain_network_g")
    p.add_argument('--opt', help="option file of the model (needed only for a checkpoint without a record; it "
                                 "replaces the record)")
    p.add_argument('--param-key', default=DEFAULT_PARAM_KEY, choices=('params', 'params_ema'))
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='load a checkpoint that needs unsafe unpickling (weights_only=False); only for trusted files')
    p.add_argument('--source', help="attention source (gaussian, edge, sift, dino_vits8, dino_resnet50); default: "
                                    "the recorded one (the options' attention_meta)")
    p.add_argument('--source-opt', action='append', default=[], metavar='KEY=VALUE',
                   help='attention source parameter (repeatable), e.g. heads=max, weights=/path/file.pth')
    p.add_argument('--seed', type=int, default=DEFAULT_SEED, help=f'sampling seed, the same for every image '
                                                                  f'(default {DEFAULT_SEED})')
    p.add_argument('--device', help='cuda or cpu (default: cuda when available)')
    p.add_argument('--sampler', choices=tuple(SAMPLERS),
                   help="sampler (default: the recorded val.sampler, else ddpm)")
    p.add_argument('--steps', '--sample-steps', dest='steps', type=positive_int,
                   help='number of sampling steps (default: the recorded sampler\'s, else diffusion.sample_steps)')
    p.add_argument('--eta', type=float, help='DDIM eta (with --sampler ddim)')
    p.add_argument('--yoda', choices=('on', 'off'), help='YODA on or off (default: as recorded)')
    p.add_argument('--tile', type=non_negative_int,
                   help='HR tile size (default: the training size network_g.image_size; 0: no tiling)')
    p.add_argument('--tile-overlap', type=non_negative_int,
                   help="HR pixels shared by neighbouring tiles (default: tile / 4, a multiple of the network's size "
                        "multiple)")
    p.add_argument('--sparse', type=parse_sparse_spec, metavar='MODE:MARGIN',
                   help='sparse YODA sampling (val.sparse): network only on crops around the active pixels, e.g. '
                        'regions:8 (an approximation: docs/performance.md)')
    p.add_argument('--region-cost', type=float, default=1024, help='val.sparse.region_cost with --sparse regions:*')
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast dtype of the network (val.amp)')
    p.add_argument('--colour-fix', choices=('none', 'wavelet', 'adain'),
                   help="colour correction against the upsampled LR after sampling (default: the recorded "
                        "val.colour_fix, else none)")
    p.add_argument('--suffix', default='', help='appended to output file stems')
    p.add_argument('--save-previews', action='store_true', help='also write the attention map and mask preview')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def checkpoint_path(name: Optional[str]) -> Optional[str]:
    """``--checkpoint``: a path, or a shipped model's name."""
    if name in SHIPPED and not os.path.exists(name):
        return os.path.join(WEIGHTS_DIR, SHIPPED[name])
    return name


def pipeline_overrides(args, opt: Optional[dict]) -> dict:
    """The command line's settings as :meth:`YODAResolver.from_network` overrides; an unset flag adds nothing,
    so the resolver's own defaults apply (the same as the API's)."""
    from yoda_plugin.inference import sampler_setting, tiling_setting
    opt = opt or {}
    overrides = {}
    sampler = sampler_setting(opt, args.sampler, args.steps, args.eta)
    if sampler is not None:
        overrides['sampler'] = sampler
    if args.sparse:
        overrides['sparse'] = {'enabled': True, 'mode': args.sparse[0], 'margin': args.sparse[1],
                               'region_cost': args.region_cost}
    if args.amp:
        overrides['amp'] = args.amp
    if args.colour_fix:
        overrides['colour_fix'] = args.colour_fix
    if args.tile is not None or args.tile_overlap is not None:
        overrides['tiling'] = tiling_setting(opt, args.tile, args.tile_overlap)
    if getattr(args, 'yoda', None):
        overrides['yoda'] = args.yoda == 'on'
    return overrides


def build_resolver(args, opt: Optional[dict] = None):
    """The YODAResolver of ``--checkpoint`` (its record) or of ``opt`` (``--opt``, loaded), with the flags'
    overrides."""
    from yoda_plugin import YODAResolver
    from yoda_plugin.attention import parse_source_opts
    from yoda_plugin.checkpoints.record import record_options, read_record
    from yoda_plugin.inference import attention_source_for
    checkpoint = checkpoint_path(args.checkpoint)
    if opt is None and not checkpoint:
        raise SetupError('no checkpoint: pass --checkpoint CKPT (or --opt OPTIONS naming path.pretrain_network_g)')
    base = opt
    wants_record = (args.source, args.source_opt, args.sampler, args.steps, args.eta, args.tile_overlap)
    if base is None and any(v is not None and v != [] for v in wants_record):  # flags that refine recorded settings
        record = read_record(checkpoint, trusted=args.trust_checkpoint)
        base = record_options(record) if record else None
    source = None
    if args.source or args.source_opt:
        source = attention_source_for(base or {}, args.device, args.source, parse_source_opts(args.source_opt))
    overrides = pipeline_overrides(args, base)
    if opt is not None:
        checkpoint = checkpoint or (opt.get('path') or {}).get('pretrain_network_g')
        if not checkpoint:
            raise SetupError(f'no checkpoint: pass --checkpoint CKPT or set path.pretrain_network_g in {args.opt}')
        trusted = args.trust_checkpoint or bool((opt.get('path') or {}).get('trust_checkpoint', False))
        resolver = YODAResolver.from_checkpoint(checkpoint, args.param_key, args.device, source, trusted, opt=opt,
                                                opt_name=f'the option file {args.opt}', **overrides)
    else:
        resolver = YODAResolver.from_checkpoint(checkpoint, args.param_key, args.device, source,
                                                args.trust_checkpoint, **overrides)
    if not resolver.pipeline.yoda.enabled and args.source:
        resolver.notes.append(f'YODA is off; --source {args.source} is ignored')
    return resolver


def image_line(name: str, lr_shape, sr_shape, info: dict, seconds: float, out: str) -> str:
    """One line per image: sizes, sampler, steps, update share, tiles, seconds (and the sparse share)."""
    stats = info.get('sparse_stats')
    share = f', network on {stats["pixels"] / max(1, stats["dense_pixels"]):.3f} of the pixels' if stats else ''
    return (f'{name}: {lr_shape[1]}x{lr_shape[0]} -> {sr_shape[1]}x{sr_shape[0]}, sampler {info["sampler_name"]}, '
            f'{info["steps"]} steps, update share {info["update_share"]:.3f}, {info["tiles"]} tile(s){share}, '
            f'{seconds:.1f} s -> {out}')


# -- main --------------------------------------------------------------------------------------------------------

def main(argv=None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from yoda_plugin.checkpoints.record import RecordError
    from yoda_plugin.utils.torch_io import UnsafeCheckpointError
    try:
        files = list_inputs(args.input)
        if not files:
            raise SetupError(f'no files in {args.input}')
        plans = planned_outputs(files, args.output, args.suffix, args.save_previews, args.overwrite)
        try:
            from yoda_plugin.utils.options import load_options
            opt = load_options(args.opt) if args.opt else None
            resolver = build_resolver(args, opt)
        except UnsafeCheckpointError as err:
            raise SetupError(str(err.with_hint('--trust-checkpoint'))) from err
        except (RecordError, ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as err:
            raise SetupError(str(err).replace('\n', ' ')) from err
    except SetupError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return run(resolver, files, plans, args)


def run(resolver, files, plans, args) -> int:
    import cv2

    from yoda_plugin.data.image_io import read_image
    os.makedirs(args.output, exist_ok=True)
    failed, written = [], []
    pipe = resolver.pipeline
    from tqdm import tqdm
    where = resolver.checkpoint + (' (its record)' if resolver.record is not None and not args.opt else '')
    print(f'checkpoint {where}: {resolver.describe()}', file=sys.stderr)
    for note in resolver.notes:
        print(f'note: {note}', file=sys.stderr)
    bar = tqdm(files, unit='image', disable=args.quiet, file=sys.stderr)
    for path in bar:
        name = os.path.basename(path)
        bar.set_description(name[:30])
        try:
            lr = read_image(path)  # decoded as BasicSR's loader does
            start = time.perf_counter()
            sr = resolver(lr, seed=args.seed)
            seconds = time.perf_counter() - start
            out = plans[path][0]
            if not cv2.imwrite(out, sr[:, :, ::-1]):
                raise OSError(f'cannot write {out}')
            info = resolver.last_info
            att = info['attention']
            if args.save_previews and att is not None:
                cv2.imwrite(plans[path][1], to_uint8(att[0, 0].cpu().numpy()))
                steps = pipe.yoda.mask(att, pipe.sampler.schedule.num_train_timesteps).steps_per_pixel(
                    pipe.sampler.schedule.timesteps)
                cv2.imwrite(plans[path][2], to_uint8(steps[0, 0].double().cpu().numpy() / pipe.steps))
            written.append(out)
            bar.write(image_line(name, lr.shape, sr.shape, info, seconds, out), file=sys.stderr)
            if info.get('sparse_note'):
                bar.write(f'note: {info["sparse_note"]}', file=sys.stderr)
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
