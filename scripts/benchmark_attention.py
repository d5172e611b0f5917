#!/usr/bin/env python
"""Throughput of attention-map precomputation, per source, split into decode / compute / LMDB write.

    python scripts/benchmark_attention.py [--device cpu|cuda] [--count 32] [--size 64] [--batch-size 8]
                                          [--sources gaussian,edge,sift,dino_vits8,dino_resnet50]

What is timed is what ``scripts/precompute_attention.py`` does per map:

* **decode**: read the PNG of an LR image from a BasicSR image LMDB (built in a temporary folder from
  ``--count`` LR images of ``--size`` x ``--size``: crops of scikit-image's sample photos, or synthetic images
  when scikit-image is missing) and decode it as BasicSR does (``cv2.IMREAD_COLOR``, BGR -> RGB);
* **compute**: ``source.batch(images)`` with ``--batch-size`` images per call (for DINO: resize, network,
  upsampling, normalisation, aggregation, copy back to the CPU);
* **write**: validate and encode every map as a 16-bit PNG, and commit them to an attention LMDB
  ``--commit-every`` maps per transaction (default 64, as ``precompute_attention.py``; the last, partial
  chunk is committed at the end and counted). ``--commit-every 1`` uses ``AttentionLMDBWriter.put``, one
  committed (fsync'ed) transaction per map.

Every source gets one untimed warm-up call first. DINO sources use **randomly initialised** networks saved in
the official key layout: pretrained weights are not needed for timing (same architecture, same cost) but the
maps themselves are meaningless. Prints one markdown table: maps/s over the three stages together, the share
of each stage, the network-only rate and the time 120,000 maps (the paper's face-SR data set, "less than two
minutes" on a GPU, i.e. > 1,000 maps/s) would take at the measured rate.
"""
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

try:
    import yoda_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import lmdb
import numpy as np
import torch

from yoda_plugin.attention import build_attention_source
from yoda_plugin.attention.dino import OFFICIAL_WEIGHTS, resnet50_backbone, vit_small_patch8
from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, encode_attention, make_attention_meta
from yoda_plugin.data.image_io import decode_image
from yoda_plugin.utils.progress import Progress

DETERMINISTIC = ('gaussian', 'edge', 'sift')
DINO = ('dino_vits8', 'dino_resnet50')
PAPER_MAPS, PAPER_SECONDS = 120_000, 120.0


def lr_images(count: int, size: int, seed: int = 0):
    """``count`` RGB uint8 LR images of size x size and where they come from."""
    rng = np.random.default_rng(seed)
    try:
        from skimage import data as skdata
        photos = [getattr(skdata, name)() for name in ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field',
                                                       'immunohistochemistry')]
        photos = [p if p.ndim == 3 else np.repeat(p[:, :, None], 3, axis=2) for p in photos]
        origin = 'crops of scikit-image sample photos'
    except Exception:  # noqa: BLE001  scikit-image is optional
        photos, origin = None, 'synthetic images (scikit-image not available)'
    images = []
    for i in range(count):
        if photos is not None:
            photo = photos[i % len(photos)][:, :, :3]
            side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            crop = photo[top:top + side, left:left + side]
            images.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
        else:
            yy, xx = np.mgrid[0:size, 0:size] / size
            img = np.stack([xx, yy, 0.5 * (xx + yy)], axis=2)
            for _ in range(3):
                h, w = rng.integers(max(1, size // 6), max(2, size // 2), size=2)
                top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                img[top:top + h, left:left + w] = rng.random(3)
            images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return images, origin


def write_image_lmdb(path: str, images) -> list:
    """A BasicSR-style image LMDB (PNG, BGR, compression 1, meta_info.txt); returns the keys."""
    keys = [f'{i:06d}' for i in range(len(images))]
    env = lmdb.open(path, map_size=max(1 << 24, 64 * sum(im.nbytes for im in images)))
    with env.begin(write=True) as txn:
        for key, img in zip(keys, images):
            ok, buf = cv2.imencode('.png', cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
            txn.put(key.encode('ascii'), buf.tobytes())
    env.close()
    with open(os.path.join(path, 'meta_info.txt'), 'w') as f:
        f.writelines(f'{k}.png ({img.shape[0]},{img.shape[1]},3) 1\n' for k, img in zip(keys, images))
    return keys


def random_dino_weights(folder: str) -> dict:
    """Seeded random ViT-S/8 and ResNet-50 saved under their official file names: {source: path}."""
    torch.manual_seed(0)
    paths = {}
    for name, model in (('dino_vits8', vit_small_patch8()), ('dino_resnet50', resnet50_backbone())):
        paths[name] = os.path.join(folder, OFFICIAL_WEIGHTS[name])
        torch.save(model.state_dict(), paths[name])
    return paths


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_source(source, device, image_lmdb: str, keys: list, out_path: str, batch_size: int,
                 commit_every: int = 64) -> dict:
    """Seconds spent decoding, computing and writing all ``keys``."""
    env = lmdb.open(image_lmdb, readonly=True, lock=False, readahead=False, meminit=False)
    try:
        warm = keys[:batch_size] if device.type == 'cuda' else keys[:1]  # a full batch: allocator, kernels
        with env.begin() as txn:  # warm-up (untimed): lazy initialisation, caches
            source.batch([decode_image(bytes(txn.get(k.encode()))) for k in warm])
        sync(device)
        times = {'decode': 0.0, 'compute': 0.0, 'write': 0.0}
        with AttentionLMDBWriter(out_path, make_attention_meta(source, grid='lr')) as writer:
            pending = []
            for start in range(0, len(keys), batch_size):
                chunk = keys[start:start + batch_size]
                t0 = time.perf_counter()
                with env.begin() as txn:
                    images = [decode_image(bytes(txn.get(k.encode()))) for k in chunk]
                t1 = time.perf_counter()
                maps = source.batch(images)  # numpy maps on the CPU: includes the device round trip
                sync(device)
                t2 = time.perf_counter()
                for key, amap in zip(chunk, maps):
                    if commit_every == 1:
                        writer.put(key, amap)
                        continue
                    pending.append((key.encode('utf-8'), encode_attention(amap, key, writer.compress_level)))
                    if len(pending) >= commit_every or (key == keys[-1]):
                        writer.put_many_encoded(pending)
                        pending = []
                t3 = time.perf_counter()
                times['decode'] += t1 - t0
                times['compute'] += t2 - t1
                times['write'] += t3 - t2
        return times
    finally:
        env.close()


TABLE_HEADER = ['| source | runs on | maps/s | decode % | compute % | write % | compute-only maps/s | 120k maps |',
                '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']


def format_row(name: str, where: str, t: dict, count: int) -> str:
    total = sum(t.values())
    rate = count / total
    seconds_120k = PAPER_MAPS / rate
    eta = f'{seconds_120k:.0f} s' if seconds_120k < 120 else f'{seconds_120k / 60:.1f} min'
    if seconds_120k >= 7200:
        eta = f'{seconds_120k / 3600:.1f} h'
    return (f'| {name} | {where} | {rate:,.1f} | {100 * t["decode"] / total:.1f} | '
            f'{100 * t["compute"] / total:.1f} | {100 * t["write"] / total:.1f} | '
            f'{count / t["compute"]:,.1f} | {eta} |')


def format_table(rows, count: int) -> str:
    return '\n'.join(TABLE_HEADER + [format_row(name, where, t, count) for name, where, t in rows])


def device_description(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'cuda ({torch.cuda.get_device_name(device)})'
    cpu = platform.processor() or platform.machine()
    return f'cpu ({cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='device of the DINO sources (default cuda if available); the others run on the CPU')
    p.add_argument('--count', type=int, default=32, help='maps per source (default 32)')
    p.add_argument('--size', type=int, default=64, help='LR image side in pixels (default 64; the paper: 16)')
    p.add_argument('--batch-size', type=int, default=8, help='images per source.batch() call (default 8)')
    p.add_argument('--commit-every', type=int, default=64, metavar='N',
                   help='maps per LMDB transaction (default 64, as precompute_attention.py); 1: '
                   'AttentionLMDBWriter.put, one transaction per map')
    p.add_argument('--sources', default=','.join(DETERMINISTIC + DINO),
                   help='comma-separated sources (default: all five)')
    p.add_argument('--workdir', default=None,
                   help='folder for the temporary LMDBs (default: the system temp folder); LMDB write times '
                   'depend on its disk')
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 1 or args.batch_size < 1 or args.commit_every < 1:
        p.error('--count, --size, --batch-size and --commit-every must be positive')
    sources = [s.strip() for s in args.sources.split(',') if s.strip()]
    unknown = sorted(set(sources) - set(DETERMINISTIC + DINO))
    if unknown:
        p.error(f'unknown source(s) {", ".join(unknown)}; choose from {", ".join(DETERMINISTIC + DINO)}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: CUDA is not available on this machine')

    tmp = tempfile.mkdtemp(prefix='yoda_att_bench_', dir=args.workdir)
    try:
        images, origin = lr_images(args.count, args.size)
        keys = write_image_lmdb(os.path.join(tmp, 'lr.lmdb'), images)
        weights = random_dino_weights(tmp) if any(s in DINO for s in sources) else {}
        print(f'device: {device_description(device)}; torch {torch.__version__}, OpenCV {cv2.__version__}')
        commits = 'one per map (AttentionLMDBWriter.put)' if args.commit_every == 1 else \
            f'one per {args.commit_every} maps'
        print(f'{args.count} LR images of {args.size}x{args.size} ({origin}), batch size {args.batch_size}, '
              f'LMDB transactions: {commits}; LMDBs in {tmp}')
        print()
        print('\n'.join(TABLE_HEADER), flush=True)
        progress = Progress('attention maps, one source at a time', len(sources), unit='sources',
                            prefix='attention')
        for name in sources:
            if name in DINO:
                source = build_attention_source(name, weights=weights[name], device=str(device))
                where = f'{device.type} (random weights)'
            else:
                source = build_attention_source(name)
                where = 'cpu'
            times = bench_source(source, device, os.path.join(tmp, 'lr.lmdb'), keys,
                                 os.path.join(tmp, f'{name}.lmdb'), args.batch_size, args.commit_every)
            print(format_row(name, where, times, args.count), flush=True)  # the row as soon as it is measured
            progress.update(detail=f'{name}: {args.count} maps, {args.count / sum(times.values()):,.1f} maps/s')
        progress.done()
        print()
        if any(s in DINO for s in sources):
            print('DINO rows use randomly initialised networks in the official key layout (pretrained weights '
                  'are absent here): same architecture and cost, meaningless maps. DINO inputs are resized to '
                  'short side 224 (the default), so their cost does not depend on --size.')
        print(f'Paper reference (supplement): {PAPER_MAPS:,} maps in less than two minutes on a GPU, i.e. '
              f'> {PAPER_MAPS / PAPER_SECONDS:,.0f} maps/s.')
        if device.type != 'cuda' and any(s in DINO for s in sources):
            print('No GPU was used for this table: the DINO rows are CPU figures and not comparable with the '
                  "paper's.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
