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


def refuse_foreign(root, folder, why: str):
    """Raise :class:`DemoRefusal` if ``folder`` exists and the demo did not make it."""
    if os.path.exists(folder) and os.path.relpath(folder, root) not in _manifest(root)['created']:
        raise DemoRefusal(f'{folder} exists and was not made by the demo ({why}); the demo deletes only its own '
                          f'folders (listed in {os.path.join(root, MANIFEST)}). Move it away, or pass another --root')


def remove_own(root, folder, why: str):
    """Delete ``folder`` if the demo made it (saying so); refuse if it exists and the demo did not make it."""
    if not os.path.exists(folder):
        return
    refuse_foreign(root, folder, why)
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
    """The test metrics of the bicubic-upsampled LR against HR on the demo validation set."""
    import cv2
    from basicsr.metrics import calculate_metric

    from yoda_plugin.data.transforms import bicubic_resize
    from yoda_plugin.models.validation import metric_takes_lq
    folder = os.path.join(root, 'datasets', 'demo')
    sums = {name: 0.0 for name in metrics_opt}
    keys = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(folder, 'val_hr')))
    for key in keys:
        hr = cv2.imread(os.path.join(folder, 'val_hr', f'{key}.png'))[:, :, ::-1]
        lr = cv2.imread(os.path.join(folder, 'val_lr', f'{key}.png'))[:, :, ::-1]
        up = bicubic_resize(np.ascontiguousarray(lr), hr.shape[:2], 'pil')
        data = {'img': np.ascontiguousarray(up[:, :, ::-1]), 'img2': np.ascontiguousarray(hr[:, :, ::-1])}
        for name, opt in metrics_opt.items():
            extra = {'lq': np.ascontiguousarray(lr[:, :, ::-1])} if metric_takes_lq(opt) else {}
            sums[name] += float(calculate_metric(dict(data, **extra), dict(opt)))
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


# The two runs the demo compares: same data, network, seed, budget and sampler; only YODA differs.
METHODS = (
    ('vanilla', 'SR3', 'train_sr3_demo.yml', 'test_sr3_demo.yml'),
    ('yoda', 'SR3 + YODA', 'train_sr3_yoda_demo.yml', 'test_sr3_yoda_demo.yml'),
)


def train_and_test(root, train_opt, test_opt, iters=None) -> dict:
    """Train one demo model through BasicSR's pipeline, test its EMA weights; return the test summary."""
    from yoda_plugin.utils.options import load_options
    name = load_options(train_opt)['name']
    exp_dir = os.path.join(root, 'experiments', name)
    # A fresh run each time (BasicSR would rename an old one to *_archived_<time>), but only over our own.
    remove_own(root, exp_dir, 'a new demo run trains from scratch')
    claim(root, exp_dir)
    test = load_options(test_opt)
    results = os.path.join(root, 'results', test['name'])
    remove_own(root, results, 'a new demo run tests again')
    claim(root, results)
    train_cmd = [sys.executable, '-m', 'yoda_plugin', 'train', '-opt', train_opt]
    if iters:
        train_cmd += ['--force_yml', f'train:total_iter={iters}', f'val:val_freq={iters}']
    print('[demo] training:', ' '.join(train_cmd), flush=True)
    start = time.time()
    subprocess.run(train_cmd, cwd=root, check=True)
    train_seconds = time.time() - start
    test_cmd = [sys.executable, '-m', 'yoda_plugin', 'test', '-opt', test_opt]
    print('[demo] testing:', ' '.join(test_cmd), flush=True)
    subprocess.run(test_cmd, cwd=root, check=True)
    with open(os.path.join(results, 'summary_demo_val.json'), encoding='utf-8') as f:
        summary = json.load(f)
    return dict(summary, name=name, experiment=exp_dir, results=results, train_seconds=train_seconds,
                images_dir=os.path.join(results, 'visualization', summary['dataset']), test_name=test['name'])


def comparison_figure(root, runs, path, max_images=3):
    """One row per validation image: LR | bicubic | each method | HR | attention, labelled; returns ``path``."""
    import cv2

    from yoda_plugin.data.transforms import bicubic_resize
    folder = os.path.join(root, 'datasets', 'demo')
    keys = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(folder, 'val_hr')))[:max_images]
    labels = ['LR', 'bicubic'] + [label for label, _ in runs] + ['HR', 'attention (YODA)']
    rows = []
    for key in keys:
        hr = cv2.imread(os.path.join(folder, 'val_hr', f'{key}.png'))
        lr = cv2.imread(os.path.join(folder, 'val_lr', f'{key}.png'))
        size = hr.shape[:2]
        tiles = [cv2.resize(lr, size[::-1], interpolation=cv2.INTER_NEAREST),
                 np.ascontiguousarray(bicubic_resize(lr[:, :, ::-1].copy(), size, 'pil')[:, :, ::-1])]
        tiles += [cv2.imread(os.path.join(run['images_dir'], f'{key}_{run["test_name"]}.png')) for _, run in runs]
        attention = os.path.join(runs[-1][1]['images_dir'], f'{key}_attention.png')
        tiles += [hr, cv2.imread(attention) if os.path.isfile(attention) else np.zeros_like(hr)]
        rows.append(np.concatenate([cv2.resize(t, size[::-1], interpolation=cv2.INTER_NEAREST) for t in tiles],
                                   axis=1))
    scale = 3  # 64 px crops are too small to judge; nearest keeps the pixels as they are
    grid = np.concatenate(rows, axis=0)
    grid = cv2.resize(grid, (grid.shape[1] * scale, grid.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    tile_w = grid.shape[1] // len(labels)
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * tile_w + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.concatenate([header, grid], axis=0))
    return path


def demo_folders(root):
    """Every folder a demo run replaces: (path, why), checked before any work starts."""
    from yoda_plugin.utils.options import load_options
    opts = options_dir()
    folders = [(os.path.join(root, 'results', 'demo_comparison'), 'a new demo run compares again')]
    for _, _, train_file, test_file in METHODS:
        folders.append((os.path.join(root, 'experiments', load_options(os.path.join(opts, train_file))['name']),
                        'a new demo run trains from scratch'))
        folders.append((os.path.join(root, 'results', load_options(os.path.join(opts, test_file))['name']),
                        'a new demo run tests again'))
    return folders


def run_demo(root, args):
    from yoda_plugin.utils.options import load_options
    opts = options_dir()
    start = time.time()
    for folder, why in demo_folders(root):  # refuse before training anything, not halfway through
        refuse_foreign(root, folder, why)
    print(f'[demo] building the demo dataset under {root}/datasets/demo ...', flush=True)
    build_demo_data(root, force=args.rebuild_data)
    runs = []
    for key, label, train_file, test_file in METHODS:
        print(f'[demo] === {label} ===', flush=True)
        runs.append((label, train_and_test(root, os.path.join(opts, train_file), os.path.join(opts, test_file),
                                           args.iters)))
    test = load_options(os.path.join(opts, METHODS[-1][3]))
    metrics_opt = test['val']['metrics']
    baseline = bicubic_baseline(root, metrics_opt)
    names = list(metrics_opt)
    yoda_run = runs[-1][1]
    iters = args.iters or load_options(os.path.join(opts, METHODS[-1][2]))['train']['total_iter']
    print(f'\n[demo] results on the demo validation crops ({yoda_run["images"]} images, 4x, '
          f'{yoda_run["sampler"]["type"].upper()} with {yoda_run["sample_steps"]} steps; same data, network, seed '
          f'and {iters} training iterations for both):')
    header = f'  {"method":<12}' + ''.join(f'{METRIC_LABELS.get(n, n):>12}' for n in names)
    print(header + f'{"update share":>14}{"s/image":>9}{"train s":>9}')
    print(f'  {"bicubic":<12}' + ''.join(f'{baseline[n]:>12.4f}' for n in names) + f'{"-":>14}{"-":>9}{"-":>9}')
    table = {'bicubic': baseline}
    for label, run in runs:
        print(f'  {label:<12}' + ''.join(f'{run["metrics"][n]:>12.4f}' for n in names)
              + f'{run["update_ratio"]:>14.3f}{run["sec_per_image"]:>9.2f}{run["train_seconds"]:>9.0f}')
        table[label] = dict(run['metrics'], update_share=run['update_ratio'], sec_per_image=run['sec_per_image'],
                            train_seconds=run['train_seconds'])
    print('  ' + '; '.join(METRIC_NOTES[n] for n in names if n in METRIC_NOTES))
    print('  (minutes of CPU training do not beat bicubic; the paper trains 1M iterations on GPUs)')
    out = os.path.join(root, 'results', 'demo_comparison')
    remove_own(root, out, 'a new demo run compares again')
    claim(root, out)
    figure = comparison_figure(root, runs, os.path.join(out, 'demo_comparison.png'))
    with open(os.path.join(out, 'demo_table.json'), 'w', encoding='utf-8') as f:
        json.dump(table, f, indent=2)
    print(f'\n[demo] side-by-side figure (LR, bicubic, SR3, SR3 + YODA, HR, attention): {figure}')
    print(f'[demo] finished in {time.time() - start:.0f} s ({args.threads} CPU threads). Where things are:')
    for label, run in runs:
        print(f'  {label}:')
        print(f'    training log, options copy : {run["experiment"]}')
        print(f'    checkpoints                : {run["experiment"]}/models (net_g_*.pth: params + params_ema)')
        print(f'    validation history (CSV)   : {run["experiment"]}/validation_demo_val.csv')
        print(f'    tensorboard                : {os.path.join(root, "tb_logger", run["name"])}')
        print(f'    test images, metrics CSV   : {run["results"]}')
    print(f'  table (JSON)                 : {os.path.join(out, "demo_table.json")}')
    return 0


METRIC_LABELS = {'psnr': 'PSNR', 'ssim': 'SSIM', 'colour_shift': 'colour', 'lr_psnr': 'LR-PSNR'}
METRIC_NOTES = {'colour_shift': 'colour: CIEDE2000 of low-passed SR vs HR, lower is better',
                'lr_psnr': 'LR-PSNR: downsampled SR vs the LR input'}


if __name__ == '__main__':
    sys.exit(main())
