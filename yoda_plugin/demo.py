"""The embedded demo: tiny SR3 + YODA trained and tested on CPU in minutes.

    python -m yoda_plugin demo            (or: yoda-demo)

1. Builds a small 4x SR dataset from the real photos scikit-image ships
   (random 96x96 training crops, 64x64 validation crops from held-out photos),
   LR by Pillow bicubic, written as BasicSR LMDBs (``datasets/demo``).
2. Computes edge-based attention maps of the LR images into attention LMDBs
   with ``scripts/precompute_attention.py``, as a user would.
3. Trains ``options/demo/train_sr3_yoda_demo.yml`` through BasicSR's pipeline
   (with validation), then tests the EMA weights with
   ``options/demo/test_sr3_yoda_demo.yml``.
4. Prints PSNR/SSIM next to the bicubic baseline on the same images and where
   images, logs, checkpoints and tensorboard files are.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TRAIN_PHOTOS = ('astronaut', 'rocket', 'immunohistochemistry', 'hubble_deep_field', 'colorwheel', 'camera')
VAL_PHOTOS = ('chelsea', 'coffee')
SCALE = 4


def _photo(name):
    from skimage import data as skdata
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def _crops(img, size, count, rng):
    from PIL import Image
    # Halve big photos first so a crop holds structure rather than one flat patch.
    if min(img.shape[:2]) >= 4 * size:
        img = np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2), Image.BICUBIC))
    out = []
    for _ in range(count):
        top = int(rng.integers(0, img.shape[0] - size + 1))
        left = int(rng.integers(0, img.shape[1] - size + 1))
        out.append(np.ascontiguousarray(img[top:top + size, left:left + size]))
    return out


MANIFEST = '.yoda_demo.json'  # under --root: the folders the demo created, the only ones it may delete


class DemoRefusal(RuntimeError):
    """The demo would have to delete or overwrite something it did not create."""


def _manifest(root) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return {'created': []}
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def claim(root, folder):
    """Record ``folder`` as made by the demo (before it is made), so a later run may replace it."""
    manifest = _manifest(root)
    rel = os.path.relpath(folder, root)
    if rel not in manifest['created']:
        manifest['created'].append(rel)
        tmp = os.path.join(root, MANIFEST + '.tmp')
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(root, MANIFEST))


def remove_own(root, folder, why: str):
    """Delete ``folder`` if the demo made it (saying so); refuse if it exists and the demo did not make it."""
    if not os.path.exists(folder):
        return
    if os.path.relpath(folder, root) not in _manifest(root)['created']:
        raise DemoRefusal(f'{folder} exists and was not made by the demo ({why}); the demo deletes only its own '
                          f'folders (listed in {os.path.join(root, MANIFEST)}). Move it away, or pass another --root')
    import shutil
    print(f'[demo] removing {folder}, made by an earlier demo run ({why})', flush=True)
    shutil.rmtree(folder)


def build_demo_data(root, seed=0, train_per_photo=16, val_per_photo=3, force=False):
    """Write datasets/demo/{train,val}_{hr,lr,attention_edge}.lmdb (and PNG folders) under ``root``."""
    import cv2

    from yoda_plugin.data.lmdb_images import write_image_lmdb
    from yoda_plugin.data.transforms import bicubic_resize

    out = os.path.join(root, 'datasets', 'demo')
    done_flag = os.path.join(out, 'COMPLETE')
    if os.path.exists(done_flag) and not force:
        return out
    remove_own(root, out, '--rebuild-data' if force else 'incomplete: no COMPLETE flag')
    claim(root, out)
    rng = np.random.default_rng(seed)
    for split, photos, size, count in (('train', TRAIN_PHOTOS, 96, train_per_photo), ('val', VAL_PHOTOS, 64,
                                                                                      val_per_photo)):
        hr, lr = {}, {}
        for name in photos:
            for i, crop in enumerate(_crops(_photo(name), size, count, rng)):
                key = f'{name}_{i:03d}'
                hr[key] = crop
                lr[key] = bicubic_resize(crop, (size // SCALE, size // SCALE), 'pil')
        for kind, images in (('hr', hr), ('lr', lr)):
            folder = os.path.join(out, f'{split}_{kind}')
            os.makedirs(folder, exist_ok=True)
            for key, img in images.items():
                cv2.imwrite(os.path.join(folder, f'{key}.png'), img[:, :, ::-1])
            write_image_lmdb(os.path.join(out, f'{split}_{kind}.lmdb'), images)
        precompute = [sys.executable, os.path.join(repo_root(), 'scripts', 'precompute_attention.py'), '--input',
                      os.path.join(out, f'{split}_lr.lmdb'), '--output', os.path.join(out, f'{split}_attention_edge.lmdb'),
                      '--source', 'edge', '--no-progress']
        print('[demo] attention maps:', ' '.join(precompute[1:]), flush=True)
        subprocess.run(precompute, check=True)
    open(done_flag, 'w').close()
    return out


def bicubic_baseline(root, metrics_opt):
    """PSNR/SSIM of the bicubic-upsampled LR against HR on the demo validation set."""
    import cv2
    from basicsr.metrics import calculate_metric

    from yoda_plugin.data.transforms import bicubic_resize
    folder = os.path.join(root, 'datasets', 'demo')
    sums = {name: 0.0 for name in metrics_opt}
    keys = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(folder, 'val_hr')))
    for key in keys:
        hr = cv2.imread(os.path.join(folder, 'val_hr', f'{key}.png'))[:, :, ::-1]
        lr = cv2.imread(os.path.join(folder, 'val_lr', f'{key}.png'))[:, :, ::-1]
        up = bicubic_resize(np.ascontiguousarray(lr), hr.shape[:2], 'pil')
        data = {'img': np.ascontiguousarray(up[:, :, ::-1]), 'img2': np.ascontiguousarray(hr[:, :, ::-1])}
        for name, opt in metrics_opt.items():
            sums[name] += float(calculate_metric(data, dict(opt)))
    return {name: total / len(keys) for name, total in sums.items()}


def repo_root():
    """The clone the plugin runs from: the demo needs its options/ and scripts/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, 'options', 'demo')):
        raise FileNotFoundError(f'options/demo not found under {root}: run the demo from a clone of the repository '
                                '(pip install -e .)')
    return root


def options_dir():
    return os.path.join(repo_root(), 'options', 'demo')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default=os.getcwd(), help='working folder (datasets/, experiments/, results/)')
    parser.add_argument('--iters', type=int, default=None, help='override train.total_iter (and val_freq)')
    parser.add_argument('--rebuild-data', action='store_true', help='rebuild datasets/demo even if present')
    parser.add_argument('--threads', type=int, default=2,
                        help='CPU threads of every step (default 2): float sums depend on the thread count, so the '
                             'same count reproduces the same numbers on any machine of the same CPU type')
    args = parser.parse_args(argv)
    import yoda_plugin  # noqa: F401

    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    if args.threads < 1:
        parser.error('--threads must be >= 1')
    pin_threads(args.threads)
    try:
        return run_demo(root, args)
    except DemoRefusal as err:
        print(f'[demo] error: {err}', file=sys.stderr)
        return 2


def pin_threads(threads: int):
    """One thread count for this process and every step it starts (OpenMP and MKL read the variables at start).

    A training run is a long chain of float sums whose order depends on the thread count (one forward pass of
    the demo UNet differs by 1e-6 between 1 and 2 threads, and 1500 training steps amplify such differences),
    while the same count gives bit-identical runs whatever the machine's load (tests/test_demo.py).
    """
    import torch
    for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def run_demo(root, args):
    from yoda_plugin.utils.options import load_options
    opts = options_dir()
    train_opt, test_opt = (os.path.join(opts, f) for f in ('train_sr3_yoda_demo.yml', 'test_sr3_yoda_demo.yml'))
    start = time.time()
    print(f'[demo] building the demo dataset under {root}/datasets/demo ...', flush=True)
    build_demo_data(root, force=args.rebuild_data)
    name = load_options(train_opt)['name']
    train_cmd = [sys.executable, '-m', 'yoda_plugin', 'train', '-opt', train_opt]
    exp_dir = os.path.join(root, 'experiments', name)
    # A fresh run each time (BasicSR would rename an old one to *_archived_<time>), but only over our own.
    remove_own(root, exp_dir, 'a new demo run trains from scratch')
    claim(root, exp_dir)
    results_dir = os.path.join(root, 'results', load_options(test_opt)['name'])
    remove_own(root, results_dir, 'a new demo run tests again')
    claim(root, results_dir)
    if args.iters:
        train_cmd += ['--force_yml', f'train:total_iter={args.iters}', f'val:val_freq={args.iters}']
    print('[demo] training:', ' '.join(train_cmd), flush=True)
    subprocess.run(train_cmd, cwd=root, check=True)
    test_cmd = [sys.executable, '-m', 'yoda_plugin', 'test', '-opt', test_opt]
    print('[demo] testing:', ' '.join(test_cmd), flush=True)
    subprocess.run(test_cmd, cwd=root, check=True)

    test = load_options(test_opt)
    results = os.path.join(root, 'results', test['name'])
    summary_path = os.path.join(results, 'summary_demo_val.json')
    with open(summary_path, encoding='utf-8') as f:
        summary = json.load(f)
    baseline = bicubic_baseline(root, test['val']['metrics'])
    names = list(test['val']['metrics'])
    print('\n[demo] results on the demo validation crops '
          f'({summary["images"]} images, 4x, {summary["sample_steps"]} sampling steps):')
    print(f'  {"method":<16}' + ''.join(f'{n.upper():>10}' for n in names))
    print(f'  {"bicubic":<16}' + ''.join(f'{baseline[n]:>10.4f}' for n in names))
    print(f'  {"SR3 + YODA":<16}' + ''.join(f'{summary["metrics"][n]:>10.4f}' for n in names))
    print(f'  YODA pixel-update share vs full diffusion: {summary["update_ratio"]:.3f}')
    print('  (a few minutes of CPU training does not beat bicubic; the paper trains 1M iterations)')
    print(f'\n[demo] finished in {time.time() - start:.0f} s ({args.threads} CPU threads). Where things are:')
    print(f'  training log, options copy : {exp_dir}')
    print(f'  checkpoints                : {exp_dir}/models (net_g_*.pth: params + params_ema)')
    print(f'  resumable training states  : {exp_dir}/training_states')
    print(f'  validation images          : {exp_dir}/visualization')
    print(f'  tensorboard                : {os.path.join(root, "tb_logger", name)}')
    print(f'  test images, metrics CSV   : {results}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
