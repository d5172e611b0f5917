"""``python -m yoda_plugin app``: a Gradio page to try YODA on your own image (``pip install -e .[app]``).

    python -m yoda_plugin app [--host 127.0.0.1] [--port 7860] [--checkpoint CKPT ...] [--max-side 128]

Upload an image (or pick a bundled example), choose the checkpoint, sampler, steps, seed, YODA on or off and
the colour fix; the page shows the LR input, bicubic, the SR, the attention map and the refined area over
time: the masks M(t) of every sampling step (a slider) with the update share. Requests wait in a queue
(one samples at a time); uploads that are no image, too large, transparent or too small get a message on the
page. The page binds to 127.0.0.1 unless ``--host`` says otherwise. docs/app.md describes it.
"""
import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)
EXAMPLES_DIR = os.path.join(HERE, 'examples')
WEIGHTS_DIR = os.path.join(PACKAGE, 'weights')
# The shipped demo models (label -> file in yoda_plugin/weights); the first is the default.
DEMO_MODELS = (('SR3 + YODA, demo x4', 'demo_sr3_yoda_x4.pth'), ('SR3, demo x4 (trained without YODA)',
                                                                 'demo_sr3_x4.pth'))
# Option files in a clone for checkpoints that carry no record of their settings.
DEMO_OPTIONS = {'demo_sr3_yoda_x4.pth': 'options/demo/test_sr3_yoda_demo.yml',
                'demo_sr3_x4.pth': 'options/demo/test_sr3_demo.yml'}
MAKE_DEMO_MODELS = ('python scripts/benchmark_convergence.py --root runs/convergence --iters 8000 --eval-every 500 '
                    '--seeds 0 1 --jobs 2 --threads 1 --export yoda_plugin/weights')
SAMPLER_NAMES = ('ddpm', 'ddim', 'dpmpp_2m')
COLOUR_FIXES = ('none', 'wavelet', 'adain')
MIN_SIDE = 8             # LR pixels; smaller images have nothing for a diffusion model to refine
DEFAULT_MAX_SIDE = 128   # LR pixels per side (--max-side); the SR is scale x larger
MAX_UPLOAD_MB = 10
MAX_STEPS = 200
DEFAULT_STEPS = 10  # the demo models' default sampler, DDPM 10 (docs/samplers.md)
ALLOWED_FORMATS = 'PNG, JPEG, BMP, TIFF or WebP'


class PageError(ValueError):
    """A request the page refuses; the message says what was wrong and what is expected."""


class UploadError(PageError):
    """An uploaded file the page refuses."""


# -- the upload: decode and check ------------------------------------------------------------------
def check_upload(path: Optional[str], max_side: int = DEFAULT_MAX_SIDE) -> Tuple[np.ndarray, List[str]]:
    """An uploaded file -> (RGB uint8 (h, w, 3), notes on conversions made). ``UploadError`` for a refused file.

    Grayscale images are converted to RGB (a note says so); an alpha channel that is fully opaque is dropped
    (a note); any transparency is refused. Sides must be ``MIN_SIDE`` .. ``max_side`` pixels.
    """
    import cv2

    from ..data.image_io import decode_image
    if not path:
        raise UploadError('no image: upload one or pick an example')
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_MB * 2 ** 20:
        raise UploadError(f'{name} is {size / 2 ** 20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB per file')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        rgb = decode_image(data)
    except (ValueError, cv2.error):
        raw = rgb = None
    if raw is None or rgb is None:
        raise UploadError(f'{name} is not an image that can be read (corrupt, truncated or another kind of file); '
                          f'expected a {ALLOWED_FORMATS} file')
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise UploadError(f'{name} is {w}x{h} pixels; each side must be at least {MIN_SIDE} pixels')
    if max(h, w) > max_side:
        raise UploadError(f'{name} is {w}x{h} pixels, larger than the limit of {max_side} pixels per side on this '
                          f'page (the SR is 4x that); crop or downscale it, or start the page with a larger '
                          f'--max-side')
    notes = []
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] == 1):
        notes.append('grayscale image: converted to RGB (the grey channel copied to R, G and B)')
    elif raw.ndim == 3 and raw.shape[2] == 4:
        alpha = raw[..., 3]
        if int(alpha.min()) < int(np.iinfo(alpha.dtype).max):
            raise UploadError(f'{name} has transparent pixels (an alpha channel below fully opaque); the model needs '
                              f'an opaque RGB image: flatten it onto a background and upload it again')
        notes.append('alpha channel fully opaque: dropped')
    if raw.dtype != np.uint8:
        notes.append(f'{raw.dtype} image: converted to 8 bits')
    return rgb, notes


# -- the models -------------------------------------------------------------------------------------
@dataclass
class Model:
    label: str
    path: str
    opt: dict          # the options that rebuild the network and its pipeline
    net: object        # the loaded network (shared by every request)
    record: Optional[dict]


def missing_model_message(label: str, path: str) -> str:
    return (f'The checkpoint "{label}" is missing: {path} does not exist. Make the demo models with '
            f'`{MAKE_DEMO_MODELS}` (in a clone of the repository), or start the page with '
            f'`--checkpoint your_model.pth`.')


def read_record(path: str) -> Optional[dict]:
    """The checkpoint's ``yoda_record`` (what rebuilding its network needs), or None for an older file."""
    from ..utils.torch_io import load_checkpoint
    ckpt = load_checkpoint(path, weights_only=True)
    record = ckpt.get('yoda_record') if isinstance(ckpt, dict) else None
    return record if isinstance(record, dict) else None


def options_from_record(record: dict) -> dict:
    """An option dict (the sections :class:`YODAResolver` reads) from a checkpoint's ``yoda_record``."""
    try:
        from ..checkpoints.record import record_options
    except ImportError:  # a package without the record module: the same sections, built here
        pass
    else:
        return record_options(record)
    dataset = {'resize': record.get('resize', 'pil')}
    if record.get('attention'):
        dataset['attention_meta'] = dict(record['attention'])
    opt = {'model_type': record['model_type'], 'scale': record['scale'], 'network_g': dict(record['network_g']),
           'diffusion': dict(record.get('diffusion') or {}), 'yoda': dict(record.get('yoda') or {'enabled': False}),
           'datasets': {'app': dataset}}
    if record.get('sampler'):
        opt['val'] = {'sampler': dict(record['sampler'])}
    for key in ('srdiff', ):  # a backbone's own section, where the record has one
        if record.get(key):
            opt[key] = dict(record[key])
    return opt


def options_for(path: str, record: Optional[dict]) -> dict:
    if record is not None:
        return options_from_record(record)
    option_file = DEMO_OPTIONS.get(os.path.basename(path))
    repo = os.path.dirname(PACKAGE)
    if option_file and os.path.exists(os.path.join(repo, option_file)):
        from ..utils.options import load_options
        return load_options(os.path.join(repo, option_file))
    raise PageError(f'{path} carries no record of its network (an older checkpoint) and no option file is known '
                      f'for it; convert it with scripts/convert_checkpoint.py, or use it with '
                      f'`python scripts/inference_yoda.py --opt OPTIONS --checkpoint {path}`')


def load_model(label: str, path: str, device) -> Model:
    from ..inference import YODAResolver
    record = read_record(path)
    opt = options_for(path, record)  # kept: each request rebuilds the pipeline from it (YODA on/off, sampler)
    if hasattr(YODAResolver, 'from_checkpoint'):
        resolver = YODAResolver.from_checkpoint(path, device=device, opt=None if record is not None else opt)
    else:
        resolver = YODAResolver.from_options(opt, path, device=device)
    return Model(label, path, opt, resolver.pipeline.net, record)


class Models:
    """The page's checkpoints by label, loaded on first use (once) and kept."""

    def __init__(self, choices: List[Tuple[str, str]], device=None):
        from ..inference import resolve_device
        self.choices, self.device = dict(choices), resolve_device(device)
        self.loaded = {}
        self.lock = threading.Lock()

    def get(self, label: str) -> Model:
        path = self.choices.get(label)
        if path is None:
            raise PageError(f'unknown checkpoint {label!r}; choose one of: {", ".join(self.choices)}')
        if not os.path.exists(path):
            raise PageError(missing_model_message(label, path))
        with self.lock:
            if label not in self.loaded:
                self.loaded[label] = load_model(label, path, self.device)
            return self.loaded[label]


def model_choices(checkpoints: Optional[List[str]] = None) -> List[Tuple[str, str]]:
    """(label, path): the given checkpoints first (the first is the default), then the shipped demo models."""
    given = [(os.path.basename(p), os.path.abspath(p)) for p in checkpoints or []]
    return given + [(label, os.path.join(WEIGHTS_DIR, name)) for label, name in DEMO_MODELS]


# -- one request ------------------------------------------------------------------------------------
def colourise(amap: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> RGB uint8 with a perceptual ramp (dark blue, teal, yellow), no plotting library."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
    x = np.clip(amap, 0, 1) * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    f = (x - i)[..., None]
    return np.round(anchors[i] * (1 - f) + anchors[i + 1] * f).astype(np.uint8)


def mask_frame(background: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """Refined pixels (M(t) = 1) in full colour with a green tint, the others dimmed grey."""
    grey = background.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.35
    on = background * 0.6 + np.array([0, 255, 80]) * 0.4
    m = np.ones(background.shape[:2], bool) if mask is None else mask
    return np.round(np.where(m[..., None], on, grey)).clip(0, 255).astype(np.uint8)


def frame_image(background: np.ndarray, frame: dict) -> np.ndarray:
    """The picture of one step's mask (``run``'s frames keep the mask bit-packed)."""
    h, w = background.shape[:2]
    mask = None if frame['mask'] is None else np.unpackbits(frame['mask'], count=h * w).reshape(h, w).astype(bool)
    return mask_frame(background, mask)


def to_uint8(x) -> np.ndarray:
    return np.clip(np.round(x[0].permute(1, 2, 0).float().cpu().numpy() * 255.0), 0, 255).astype(np.uint8)


def run(models: Models, lr: np.ndarray, label: str, sampler: str, steps: int, seed: int, yoda_on: bool,
        colour_fix: str, progress=None) -> dict:
    """Super-resolve ``lr`` (RGB uint8): the images, the masks of every step and the numbers the page shows."""
    import torch

    from ..data.transforms import bicubic_resize
    from ..inference import YODAResolver
    if sampler not in SAMPLER_NAMES:
        raise PageError(f'unknown sampler {sampler!r}; expected one of {", ".join(SAMPLER_NAMES)}')
    if colour_fix not in COLOUR_FIXES:
        raise PageError(f'unknown colour fix {colour_fix!r}; expected one of {", ".join(COLOUR_FIXES)}')
    steps, seed = int(steps), int(seed)
    if not 1 <= steps <= MAX_STEPS:
        raise PageError(f'steps must be 1 to {MAX_STEPS}, got {steps}')
    model = models.get(label)
    opt = {**model.opt, 'yoda': {**(model.opt.get('yoda') or {}), 'enabled': bool(yoda_on)}}
    resolver = YODAResolver.from_network(model.net, opt, models.device, sampler={'type': sampler, 'steps': steps},
                                         colour_fix=colour_fix)
    h, w = lr.shape[:2]
    H, W = h * resolver.scale, w * resolver.scale
    bicubic = bicubic_resize(lr, (H, W), resolver.resize)
    masks = []
    timesteps = resolver.pipeline.sampler.schedule.timesteps

    def on_step(k, z, mask):
        masks.append((int(k), None if mask is None else mask[0, 0, :H, :W].bool().cpu().numpy()))
        if progress is not None:
            progress(len(masks) / steps, desc=f'sampling: step {len(masks)} of {steps}')

    start = time.perf_counter()
    with torch.no_grad():
        sr = resolver.super_resolve_one(lr, seed=seed, callback=on_step)
    seconds = time.perf_counter() - start
    info = resolver.last_info
    attention = info.get('attention')
    amap = None if attention is None else attention[0, 0, :H, :W].float().cpu().numpy()
    frames = []
    for k, mask in masks:
        share = 1.0 if mask is None else float(mask.mean())
        t = int(timesteps[k]) if k < len(timesteps) else k
        # Bit-packed: 200 steps of a 512x512 mask take 6.5 MB in the page's session state, not 157 MB of images.
        frames.append({'k': k, 't': t, 'share': share, 'mask': None if mask is None else np.packbits(mask)})
    return {'sr': to_uint8(sr), 'bicubic': bicubic, 'attention': None if amap is None else colourise(amap),
            'frames': frames, 'update_share': float(info['update_ratio']), 'seconds': seconds,
            'sampler': sampler, 'steps': steps, 'yoda': bool(yoda_on), 'T': int(resolver.pipeline.sampler.schedule
                                                                                  .num_train_timesteps)}


# -- the page ---------------------------------------------------------------------------------------
def frame_caption(frame: dict, steps: int, position: int) -> str:
    return (f'step {position} of {steps} (grid step k = {frame["k"]}, training time t = {frame["t"]}): '
            f'**{100 * frame["share"]:.1f}%** of the pixels refined (M(t) = 1)')


def share_table(frames: List[dict]):
    import pandas as pd  # a Gradio dependency
    return pd.DataFrame({'step': list(range(1, len(frames) + 1)),
                         'refined area %': [100 * f['share'] for f in frames]})


def build_page(models: Models, max_side: int = DEFAULT_MAX_SIDE):
    import gradio as gr
    labels = list(models.choices)
    examples = sorted(os.path.join(EXAMPLES_DIR, f) for f in os.listdir(EXAMPLES_DIR) if f.endswith('.png'))
    missing = [missing_model_message(lb, p) for lb, p in models.choices.items() if not os.path.exists(p)]

    def on_upload(path):
        if not path:
            return None, ''
        try:
            lr, notes = check_upload(path, max_side)
        except UploadError as e:
            return None, f'**Cannot use this upload:** {e}'
        h, w = lr.shape[:2]
        return lr, f'Input: {w}x{h} pixels.' + ''.join(f' Note: {n}.' for n in notes)

    def on_run(path, label, sampler, steps, seed, yoda_on, colour_fix, progress=gr.Progress()):
        empty = (None, None, None, None, None, gr.update(maximum=2, value=1), '', {}, None)
        try:
            lr, notes = check_upload(path, max_side)
            progress(0, desc='loading the model')
            result = run(models, lr, label, sampler, steps, seed, yoda_on, colour_fix, progress)
        except UploadError as e:
            return (f'**Cannot use this upload:** {e}', ) + empty
        except PageError as e:
            return (f'**Cannot run:** {e}', ) + empty
        except Exception as e:  # noqa: BLE001 - the page stays up; the message names what failed
            return (f'**Sampling failed:** {type(e).__name__}: {e}', ) + empty
        frames = result['frames']
        h, w = lr.shape[:2]
        H, W = result['sr'].shape[:2]
        attention_note = '' if result['yoda'] else ' YODA off: every pixel is refined at every step.'
        status = (f'Done: {w}x{h} -> {W}x{H} with {label}, {result["sampler"]} {result["steps"]} steps, seed '
                  f'{int(seed)}, YODA {"on" if result["yoda"] else "off"}, colour fix {colour_fix}; '
                  f'update share **{100 * result["update_share"]:.1f}%** of full diffusion\'s pixel updates; '
                  f'{result["seconds"]:.1f} s.' + ''.join(f' Note: {n}.' for n in notes) + attention_note)
        first = frames[0] if frames else None
        state = {'bicubic': result['bicubic'], 'frames': frames}
        sr_label = 'SR (YODA)' if result['yoda'] else 'SR (vanilla diffusion: YODA off)'
        return (status, lr, result['bicubic'], gr.update(value=result['sr'], label=sr_label), result['attention'],
                frame_image(result['bicubic'], first) if first else None,
                gr.update(minimum=1, maximum=max(len(frames), 2), value=1, step=1),
                frame_caption(first, len(frames), 1) if first else '', state, share_table(frames))

    def on_slide(position, state):
        frames = (state or {}).get('frames')
        if not frames:
            return None, ''
        i = min(max(int(position), 1), len(frames)) - 1
        return frame_image(state['bicubic'], frames[i]), frame_caption(frames[i], len(frames), i + 1)

    with gr.Blocks(title='YODA super-resolution') as page:
        gr.Markdown('# YODA: You Only Diffuse Areas\nAttention-guided diffusion super-resolution (x4). YODA '
                    'refines a pixel only from the step where T (A + l) >= t: high-attention areas get many steps, '
                    'flat areas few. Upload a small image or pick an example; the SR is 4x larger.\n\n'
                    f'Limits: {ALLOWED_FORMATS}; {MIN_SIDE} to {max_side} pixels per side; up to {MAX_UPLOAD_MB} '
                    'MB. Grayscale images are converted to RGB; transparent images are refused. One request '
                    'samples at a time; others wait in the queue.')
        for message in missing:
            gr.Markdown(f'**Note:** {message}')
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label='Upload an image', type='filepath', elem_id='upload')
                gr.Examples(examples=[[p] for p in examples], inputs=[upload], label='Examples')
                model = gr.Dropdown(labels, value=labels[0], label='Checkpoint', elem_id='checkpoint')
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLER_NAMES), value='ddpm', label='Sampler', elem_id='sampler')
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label='Steps', elem_id='steps')
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label='Seed', elem_id='seed')
                    colour_fix = gr.Dropdown(list(COLOUR_FIXES), value='none', label='Colour fix')
                yoda_on = gr.Checkbox(value=True, label='YODA (attention-guided masks); off: vanilla diffusion',
                                      elem_id='yoda')
                button = gr.Button('Super-resolve', variant='primary', elem_id='run')
            with gr.Column(scale=2):
                status = gr.Markdown('', elem_id='status')
                with gr.Row():
                    lr_view = gr.Image(label='LR input', type='numpy', interactive=False, elem_id='lr')
                    bicubic_view = gr.Image(label='Bicubic x4', type='numpy', interactive=False, elem_id='bicubic')
                with gr.Row():
                    sr_view = gr.Image(label='SR (YODA)', type='numpy', interactive=False, format='png',
                                       elem_id='sr')
                    attention_view = gr.Image(label='Attention map A (yellow: high)', type='numpy',
                                              interactive=False, elem_id='attention')
                gr.Markdown('### Refined area over time\nThe mask M(t) of each sampling step (green: refined '
                            'at that step, grey: kept at the noisy LR); sampling runs from step 1 (t = T) to the last '
                            '(t near 0).')
                mask_view = gr.Image(label='M(t)', type='numpy', interactive=False, elem_id='mask')
                mask_slider = gr.Slider(1, 2, value=1, step=1, label='Sampling step', elem_id='mask_slider')
                mask_caption = gr.Markdown('', elem_id='mask_caption')
                share_plot = gr.LinePlot(x='step', y='refined area %', label='Refined area per sampling step',
                                         y_lim=[0, 100], elem_id='share_plot')
        frames_state = gr.State({})
        upload.change(on_upload, [upload], [lr_view, status])
        button.click(on_run, [upload, model, sampler, steps, seed, yoda_on, colour_fix],
                     [status, lr_view, bicubic_view, sr_view, attention_view, mask_view, mask_slider,
                      mask_caption, frames_state, share_plot], concurrency_limit=1)
        mask_slider.change(on_slide, [mask_slider, frames_state], [mask_view, mask_caption])
    return page


def build_parser():
    p = argparse.ArgumentParser(prog='python -m yoda_plugin app', description='Start a Gradio page to try YODA on your own image '
                                '(pip install -e .[app]; docs/app.md).')
    p.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only; '
                   '0.0.0.0 serves the network)')
    p.add_argument('--port', type=int, default=7860)
    p.add_argument('--checkpoint', action='append', metavar='CKPT',
                   help='a checkpoint to offer (repeatable; the first is the default), besides the shipped demo '
                   'models; it must carry its record (checkpoints written by this project do)')
    p.add_argument('--max-side', type=int, default=DEFAULT_MAX_SIDE,
                   help=f'largest LR side accepted, in pixels (default {DEFAULT_MAX_SIDE})')
    p.add_argument('--device', help='cuda, cpu, ... (default: cuda when available)')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_side < MIN_SIDE:
        build_parser().error(f'--max-side must be at least {MIN_SIDE}, got {args.max_side}')
    for path in args.checkpoint or []:
        if not os.path.exists(path):
            build_parser().error(f'--checkpoint {path}: no such file')
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('the page needs Gradio: pip install -e .[app]  (or: pip install gradio)', file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    models = Models(model_choices(args.checkpoint), args.device)
    page = build_page(models, args.max_side)
    page.queue(default_concurrency_limit=1)
    print(f'YODA page on http://{args.host}:{args.port} (Ctrl+C stops it)', flush=True)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[EXAMPLES_DIR],
                max_file_size=f'{MAX_UPLOAD_MB}mb', quiet=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
