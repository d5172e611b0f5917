"""The embedded demo: SR3 and SR3 + YODA on real photos, on a CPU, in minutes.

    python -m yoda_plugin demo            (or: yoda-demo, or bash scripts/demo.sh)

1. Builds a small 4x SR dataset from the real photos scikit-image and matplotlib
   ship (whole training photos, cropped at random at every step; 64x64
   validation crops of held-out photos), LR by Pillow bicubic, written as
   BasicSR LMDBs (``datasets/demo``), with edge-based attention maps computed
   by ``scripts/precompute_attention.py`` as a user would.
2. Tests the converged demo models that ship with the plugin
   (``yoda_plugin/weights``: vanilla SR3 and SR3 + YODA, made by
   ``scripts/benchmark_convergence.py``, docs/convergence.md) through BasicSR's
   test pipeline.
3. Trains both from scratch for a few hundred iterations through BasicSR's
   training pipeline (with validation) and tests them: the whole pipeline at
   work, short of convergence.
4. Prints both tables next to the bicubic baseline on the same images, a
   side-by-side figure of the shipped models, and where images, logs,
   checkpoints and tensorboard files are.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# Real photos that the installed packages ship (scikit-image; matplotlib's grace_hopper). Training draws a
# fresh random crop of a random training photo at every step (YODAPairedDataset with gt_size), instead of a
# fixed set of crops: 96 fixed crops over-fitted after ~2,000 iterations. Validation photos are held out.
TRAIN_PHOTOS = ('astronaut', 'rocket', 'immunohistochemistry', 'hubble_deep_field', 'motorcycle_left', 'retina',
                'grace_hopper', 'camera', 'brick', 'grass', 'gravel', 'coins', 'moon')
VAL_PHOTOS = ('chelsea', 'coffee')
SCALE = 4
_PHOTO_FILES = {'immunohistochemistry': 'ihc.png', 'hubble_deep_field': 'hubble_deep_field.jpg',
                'motorcycle_left': 'motorcycle_left.png', 'retina': 'retina.jpg', 'rocket': 'rocket.jpg'}


def _photo(name):
    """RGB uint8 photo ``name`` read from the file an installed package ships (no download)."""
    import cv2
    if name == 'grace_hopper':
        import matplotlib
        path = os.path.join(matplotlib.get_data_path(), 'sample_data', 'grace_hopper.jpg')
    else:
        import skimage
        path = os.path.join(os.path.dirname(skimage.__file__), 'data', _PHOTO_FILES.get(name, f'{name}.png'))
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f'demo photo {name!r}: cannot read {path} (reinstall scikit-image / matplotlib)')
    return np.ascontiguousarray(img[:, :, ::-1])


def _demo_scale(img, size):
    """Halve big photos first, so a ``size`` crop holds structure rather than one flat patch."""
    from PIL import Image
    if min(img.shape[:2]) >= 4 * size:
        img = np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2), Image.BICUBIC))
    return img


def _crops(img, size, count, rng):
    img = _demo_scale(img, size)
    out = []
    for _ in range(count):
        top = int(rng.integers(0, img.shape[0] - size + 1))
        left = int(rng.integers(0, img.shape[1] - size + 1))
        out.append(np.ascontiguousarray(img[top:top + size, left:left + size]))
    return out


def _whole(img, size):
    """The whole (halved) photo, cut to a multiple of the scale: training crops it anew at every step."""
    img = _demo_scale(img, size)
    h, w = img.shape[0] - img.shape[0] % SCALE, img.shape[1] - img.shape[1] % SCALE
    return np.ascontiguousarray(img[:h, :w])


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


def build_demo_data(root, seed=0, val_per_photo=4, force=False, train_photos=TRAIN_PHOTOS):
    """Write datasets/demo/{train,val}_{hr,lr,attention_edge}.lmdb (and PNG folders) under ``root``.

    Training: the whole photos (training crops them at random each step); validation: ``val_per_photo``
    64x64 crops of each held-out photo.
    """
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
    for split in ('train', 'val'):
        hr, lr = {}, {}
        if split == 'train':
            hr = {name: _whole(_photo(name), 64) for name in train_photos}
        else:
            for name in VAL_PHOTOS:
                for i, crop in enumerate(_crops(_photo(name), 64, val_per_photo, rng)):
                    hr[f'{name}_{i:03d}'] = crop
        for key, img in hr.items():
            lr[key] = bicubic_resize(img, (img.shape[0] // SCALE, img.shape[1] // SCALE), 'pil')
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
    parser.add_argument('--iters', type=int, default=None,
                        help="iterations of the from-scratch training (default: the option files' train.total_iter; "
                             '0: skip it)')
    parser.add_argument('--no-converged', action='store_true',
                        help='skip the shipped trained models (only the from-scratch training)')
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
    except (DemoRefusal, ShippedCheckpointError) as err:
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


WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
SHIPPED = {'vanilla': 'demo_sr3_x4.pth', 'yoda': 'demo_sr3_yoda_x4.pth'}
MAKE_WEIGHTS = ('python scripts/benchmark_convergence.py --root runs/convergence --iters 8000 --seeds 0 1 '
                '--export yoda_plugin/weights (docs/convergence.md)')


class ShippedCheckpointError(RuntimeError):
    """A shipped demo checkpoint is missing, unreadable or does not fit the demo's options."""


def shipped_checkpoint(method: str, network_g: dict) -> dict:
    """Check the shipped checkpoint of ``method``; return its record (``yoda_record``)."""
    import torch
    path = os.path.join(WEIGHTS_DIR, SHIPPED[method])
    remake = f'restore it (git checkout -- yoda_plugin/weights) or remake it: {MAKE_WEIGHTS}'
    if not os.path.isfile(path):
        raise ShippedCheckpointError(f'the shipped demo checkpoint {path} is missing: {remake}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # any unpickling/zip error: the file is damaged
        raise ShippedCheckpointError(f'the shipped demo checkpoint {path} cannot be read '
                                     f'({type(err).__name__}: {str(err).splitlines()[0][:160]}): {remake}') from err
    if not isinstance(state, dict) or 'params_ema' not in state or 'yoda_record' not in state:
        raise ShippedCheckpointError(f'the shipped demo checkpoint {path} lacks params_ema or yoda_record: {remake}')
    record = state['yoda_record']
    theirs = {k: v for k, v in record.get('network_g', {}).items()}
    differ = sorted(k for k in set(theirs) | set(network_g) if theirs.get(k) != network_g.get(k))
    if differ:
        raise ShippedCheckpointError(f'the shipped demo checkpoint {path} was made for another network '
                                     f'(network_g keys differ: {differ}): {remake}')
    return dict(record, path=path)


def evaluate_checkpoint(root, test_opt, checkpoint, suffix) -> dict:
    """Test ``checkpoint`` (EMA weights) with ``test_opt`` under the results name ``<name><suffix>``."""
    from yoda_plugin.utils.options import load_options
    test = load_options(test_opt)
    name = test['name'] + suffix
    results = os.path.join(root, 'results', name)
    remove_own(root, results, 'a new demo run tests again')
    claim(root, results)
    cmd = [sys.executable, '-m', 'yoda_plugin', 'test', '-opt', test_opt, '--force_yml', f'name={name}',
           f'path:pretrain_network_g={checkpoint}']
    print('[demo] testing:', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, check=True)
    with open(os.path.join(results, 'summary_demo_val.json'), encoding='utf-8') as f:
        summary = json.load(f)
    return dict(summary, name=name, experiment=None, results=results, train_seconds=None,
                images_dir=os.path.join(results, 'visualization', summary['dataset']), test_name=name)


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
    for _, _, _, test_file in METHODS:
        folders.append((os.path.join(root, 'results', load_options(os.path.join(opts, test_file))['name']
                                     + CONVERGED_SUFFIX), 'a new demo run tests again'))
    for _, _, train_file, test_file in METHODS:
        folders.append((os.path.join(root, 'experiments', load_options(os.path.join(opts, train_file))['name']),
                        'a new demo run trains from scratch'))
        folders.append((os.path.join(root, 'results', load_options(os.path.join(opts, test_file))['name']),
                        'a new demo run tests again'))
    return folders


CONVERGED_SUFFIX = '_converged'


def print_table(title, baseline, runs, names):
    print(title)
    header = f'  {"method":<12}' + ''.join(f'{METRIC_LABELS.get(n, n):>12}' for n in names)
    print(header + f'{"update share":>14}{"s/image":>9}{"train s":>9}')
    print(f'  {"bicubic":<12}' + ''.join(f'{baseline[n]:>12.4f}' for n in names) + f'{"-":>14}{"-":>9}{"-":>9}')
    table = {}
    for label, run in runs:
        train_s = f'{run["train_seconds"]:>9.0f}' if run['train_seconds'] is not None else f'{"-":>9}'
        print(f'  {label:<12}' + ''.join(f'{run["metrics"][n]:>12.4f}' for n in names)
              + f'{run["update_ratio"]:>14.3f}{run["sec_per_image"]:>9.2f}' + train_s)
        table[label] = dict(run['metrics'], update_share=run['update_ratio'], sec_per_image=run['sec_per_image'],
                            train_seconds=run['train_seconds'])
    return table


def run_demo(root, args):
    from yoda_plugin.utils.options import load_options
    opts = options_dir()
    start = time.time()
    for folder, why in demo_folders(root):  # refuse before training anything, not halfway through
        refuse_foreign(root, folder, why)
    records = {}
    if not args.no_converged:  # checked before any work: a damaged file is reported at once
        for key, _, _, test_file in METHODS:
            records[key] = shipped_checkpoint(key, dict(load_options(os.path.join(opts, test_file))['network_g']))
    print(f'[demo] building the demo dataset under {root}/datasets/demo ...', flush=True)
    build_demo_data(root, force=args.rebuild_data)
    test = load_options(os.path.join(opts, METHODS[-1][3]))
    metrics_opt = test['val']['metrics']
    names = list(metrics_opt)
    baseline = bicubic_baseline(root, metrics_opt)
    out_table = {'bicubic': baseline}

    converged = []
    for key, label, _, test_file in METHODS if records else ():
        print(f'[demo] === {label}: the converged model that ships with the plugin (docs/convergence.md) ===',
              flush=True)
        converged.append((label, evaluate_checkpoint(root, os.path.join(opts, test_file), records[key]['path'],
                                                 CONVERGED_SUFFIX)))
    scratch = []
    iters = args.iters if args.iters is not None else \
        load_options(os.path.join(opts, METHODS[-1][2]))["train"]["total_iter"]
    if iters > 0:
        for key, label, train_file, test_file in METHODS:
            print(f'[demo] === {label}: trained from scratch now ({iters} iterations) ===', flush=True)
            scratch.append((label, train_and_test(root, os.path.join(opts, train_file),
                                                  os.path.join(opts, test_file), args.iters)))
    first = (converged or scratch)[-1][1]
    print(f'\n[demo] results on the demo validation crops ({first["images"]} images, 4x, '
          f'{first["sampler"]["type"].upper()} with {first["sample_steps"]} steps; both methods share data, '
          'network, seed, budget and sampler):')
    if converged:
        trained = records['yoda']['training']['iterations']
        out_table['converged'] = print_table(
            f'\n  shipped models (yoda_plugin/weights, {trained} iterations of batch '
            f'{records["yoda"]["training"]["batch"]} on this recipe; docs/convergence.md):', baseline, converged, names)
    if scratch:
        out_table['from_scratch'] = print_table(
            f'\n  trained from scratch by this run ({iters} iterations: the pipeline at work, short of convergence):',
            baseline, scratch, names)
    print('  ' + '; '.join(METRIC_NOTES[n] for n in names if n in METRIC_NOTES))
    out = os.path.join(root, 'results', 'demo_comparison')
    remove_own(root, out, 'a new demo run compares again')
    claim(root, out)
    shown = converged or scratch
    figure = comparison_figure(root, shown, os.path.join(out, 'demo_comparison.png'))
    with open(os.path.join(out, 'demo_table.json'), 'w', encoding='utf-8') as f:
        json.dump(out_table, f, indent=2)
    which = 'shipped models' if converged else f'models trained {iters} iterations'
    print(f'\n[demo] side-by-side figure (LR, bicubic, SR3, SR3 + YODA, HR, attention; {which}): {figure}')
    print(f'[demo] finished in {time.time() - start:.0f} s ({args.threads} CPU threads). Where things are:')
    for label, run in converged + scratch:
        print(f'  {label}{" (shipped)" if run["experiment"] is None else " (from scratch)"}:')
        if run['experiment']:
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
