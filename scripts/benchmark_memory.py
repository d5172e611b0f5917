#!/usr/bin/env python
"""Peak memory of one SR3+YODA training step for each paper scenario, with and without gradient checkpointing.

    python scripts/benchmark_memory.py [--options OPT ...] [--device cpu|cuda] [--limit-gb 12]

For every option file (default: the three SR3+YODA scenarios) the script
builds its model (``model_type`` with ``network_g`` at full size, the option
file's optimizer, loss and EMA) and runs one step of the model's own training
(``optimize_parameters``, on a synthetic batch with a Gaussian attention map)
in a fresh child process per batch size, for batch 1, 2, 4, ... up to the
option file's ``batch_size_per_gpu``. Reported memory:

* CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, no allocator cache);
* CPU: the child's peak resident set size (``ru_maxrss``) minus its size after
  the imports, i.e. weights, their EMA copy, gradients, optimizer state and activations.

A batch whose memory, extrapolated linearly from the last two batches, would
exceed ``--limit-gb`` is not run (this machine must not swap); the table then
gives the largest batch that fits and the extrapolated value at the paper's
batch size, marked as such. Prints one Markdown table, each row as soon as its
scenario is measured, and a progress line per child process on stderr.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OPTIONS = ['options/train_sr3_yoda.yml', 'options/train_sr3_yoda_64_256.yml',
                   'options/train_sr3_yoda_64_512.yml']


def rss_kib() -> int:
    """Current resident set size of this process in KiB (Linux /proc)."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') // 1024


def child(args) -> dict:
    """One training step of the model in this process; returns the measurement as a dict."""
    start_kib = rss_kib()
    import torch

    sys.path.insert(0, REPO)
    from yoda_plugin.apps.training_step import synthetic_batch, training_model
    start_kib = max(start_kib, rss_kib())  # torch's import is not the step's memory
    opt = json.loads(args.child)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    model = training_model(opt, device)
    data = synthetic_batch(opt, args.batch, device)
    t = time.perf_counter()
    model.feed_data(data)
    model.optimize_parameters(1)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kib) / 2**20
    return {'peak_gib': peak, 'step_s': time.perf_counter() - t, 'loss': float(model.log_dict['l_pix'])}


def scenario(path: str) -> dict:
    sys.path.insert(0, REPO)
    from yoda_plugin.utils.options import load_options
    opt = load_options(os.path.join(REPO, path) if not os.path.isabs(path) else path)
    if 'image_size' not in opt['network_g']:
        raise SystemExit(f'{path}: network_g.image_size is needed to size the benchmark input')
    sections = {k: opt[k] for k in ('name', 'model_type', 'scale', 'network_g', 'diffusion', 'yoda', 'train', 'srdiff')
                if k in opt}
    return {'name': opt['name'], 'opt': sections, 'size': opt['network_g']['image_size'],
            'batch': int(opt['datasets']['train']['batch_size_per_gpu']), 'scale': opt['scale']}


def measure(opt: dict, batch: int, checkpoint: bool, device: str) -> dict:
    opt = dict(opt, network_g=dict(opt['network_g'], use_checkpoint=checkpoint))
    cmd = [sys.executable, os.path.abspath(__file__), '--child', json.dumps(opt), '--batch', str(batch), '--device',
           device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {'error': ' / '.join(tail) or f'exit code {out.returncode}'}
    return json.loads(out.stdout.strip().splitlines()[-1])


def batches_up_to(n: int) -> list:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]


def print_row(row: dict):
    m = row['measured']
    one = f'{m[1]["peak_gib"]:.2f}' if 1 in m else '-'
    bs = sorted(m)
    slope = (f'{(m[bs[-1]]["peak_gib"] - m[bs[0]]["peak_gib"]) / (bs[-1] - bs[0]):.2f}' if len(bs) >= 2 else '-')
    if row['paper_batch'] in m:
        at_paper = f'{m[row["paper_batch"]]["peak_gib"]:.2f}'
    elif 'extrapolated' in row:
        at_paper = f'{row["extrapolated"]:.1f} (extrapolated; largest run: {row["fits"]})'
    else:
        at_paper = '-'
    step = f'{m[bs[-1]]["step_s"]:.1f} (batch {bs[-1]})' if bs else '-'
    print(f'| {row["scenario"]} | {row["size"]} | {row["paper_batch"]} | {"on" if row["checkpoint"] else "off"} | '
          f'{one} | {slope} | {at_paper} | {step} | {row["note"]} |', flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--options', nargs='+', default=DEFAULT_OPTIONS, help='training option files (SR3 networks)')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--limit-gb', type=float, default=12.0, help='do not run a batch expected above this (GiB)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import torch
    sys.path.insert(0, REPO)
    from yoda_plugin.utils.progress import Progress
    where = torch.cuda.get_device_name(0) if args.device == 'cuda' else f'CPU, {os.cpu_count()} cores'
    kind = 'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'peak RSS above the imports'
    scenarios = [scenario(path) for path in args.options]
    print(f'[memory] plan: {len(scenarios)} scenarios x gradient checkpointing off/on, one child process per batch '
          f'(' + '; '.join(f'{sc["name"]}: batches {batches_up_to(sc["batch"])}' for sc in scenarios) +
          f'), batches expected above --limit-gb {args.limit_gb:g} skipped', file=sys.stderr, flush=True)
    print(f'\nSR3+YODA training step memory ({kind}), {where}, torch {torch.__version__}')
    print('| scenario | HR size | paper batch | grad. checkpointing | peak at batch 1, GiB | per extra sample, GiB | '
          'peak at paper batch, GiB | s/step at largest batch run | note |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |', flush=True)
    for sc in scenarios:
        for checkpoint in (False, True):
            done = []  # (batch, peak)
            row = {'scenario': sc['name'], 'size': sc['size'], 'paper_batch': sc['batch'],
                   'checkpoint': checkpoint, 'fits': 0, 'measured': {}, 'note': ''}
            batches = batches_up_to(sc['batch'])
            # A child's time grows with its batch: estimate the time left in samples (plus one for start-up).
            progress = Progress(f'{sc["name"]} ({sc["size"]} px), gradient checkpointing '
                                f'{"on" if checkpoint else "off"}', len(batches), unit='batches', prefix='memory',
                                weights=[b + 1 for b in batches])
            for b in batches:
                if len(done) >= 2:
                    (b0, m0), (b1, m1) = done[-2:]
                    expected = m1 + (m1 - m0) / (b1 - b0) * (b - b1)
                    if expected > args.limit_gb:
                        row['note'] = f'batch {b} expected {expected:.1f} GiB > --limit-gb {args.limit_gb:g}: not run'
                        break
                r = measure(sc['opt'], b, checkpoint, args.device)
                if 'error' in r:
                    row['note'] = f'batch {b}: {r["error"]}'
                    break
                done.append((b, r['peak_gib']))
                row['measured'][b] = r
                row['fits'] = b
                progress.update(detail=f'batch {b}: {r["peak_gib"]:.2f} GiB, {r["step_s"]:.1f} s/step')
            progress.done(row['note'])
            if row['fits'] < sc['batch'] and len(done) >= 2:
                (b0, m0), (b1, m1) = done[-2:]
                row['extrapolated'] = m1 + (m1 - m0) / (b1 - b0) * (sc['batch'] - b1)
            print_row(row)
    return 0


if __name__ == '__main__':
    sys.exit(main())
