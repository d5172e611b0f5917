#!/usr/bin/env python
"""OpenMP's wait policy under load: sampling time with spinning (ACTIVE) and sleeping (PASSIVE) threads.

    python scripts/benchmark_thread_wait.py [--size 64] [--steps 20] [--repeats 3]

Runs one SR3 sampling job (a demo-sized UNet, random weights, YODA on) in a fresh
process per setting, with OMP_WAIT_POLICY unset (libgomp's default: spin a while,
then sleep), ACTIVE and PASSIVE, on a quiet machine and next to one busy
neighbour process (a pure-Python loop on one core), and prints one table: median
seconds per job, the ratio to the quiet unset run, and whether the output equals
the first output bit for bit (the wait policy never changes results).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

JOB = r'''
import sys, time, torch
sys.path.insert(0, {repo!r})
from yoda_plugin.archs.sr3_unet_arch import SR3UNet
from yoda_plugin.core import DiffusionSchedule, SamplerConfig, YODAConfig, make_beta_schedule
from yoda_plugin.core.pipeline import DiffusionSR
torch.manual_seed(0)
net = SR3UNet(in_channels=6, out_channels=3, base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1,
              attn_resolutions=[16], image_size={size}, dropout=0.0, norm_groups=8).eval()
sched = DiffusionSchedule(make_beta_schedule('linear', 500, 4e-6, 4e-2))
pipe = DiffusionSR(net, 'sr3', sched, 4, YODAConfig(), SamplerConfig('ddpm', {steps}))
g = torch.Generator().manual_seed(1)
lq = torch.rand(1, 3, {size} // 4, {size} // 4, generator=g)
lq_up = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
att = torch.rand(1, 1, {size}, {size}, generator=g)
start = time.perf_counter()
out, _ = pipe(lq, lq_up, att, torch.Generator().manual_seed(2))
print(time.perf_counter() - start)
torch.save(out, {out!r})
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=64, help='HR size (a multiple of 16)')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--tmp', default='/tmp')
    args = p.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import torch
    rows, reference = [], None
    settings = [(load, policy) for load in ('quiet', 'one busy neighbour') for policy in ('unset', 'ACTIVE', 'PASSIVE')]
    print(f'{args.size}x{args.size} HR, {args.steps} DDPM steps, {args.repeats} runs per setting', flush=True)
    print('| machine | OMP_WAIT_POLICY | s per job (median) | / quiet unset | output identical |', flush=True)
    print('| --- | --- | --- | --- | --- |', flush=True)
    for i, (load, policy) in enumerate(settings):
        busy = None
        if load != 'quiet':
            busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
        try:
            times, same = [], True
            for r in range(args.repeats):
                out_path = os.path.join(args.tmp, f'thread_wait_{os.getpid()}_{i}_{r}.pt')
                code = JOB.format(repo=repo, size=args.size, steps=args.steps, out=out_path)
                env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
                if policy != 'unset':  # unset: libgomp spins a while, then sleeps
                    env['OMP_WAIT_POLICY'] = policy
                proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                                      timeout=1800)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                times.append(float(proc.stdout.strip().splitlines()[-1]))
                out = torch.load(out_path, weights_only=True)
                os.remove(out_path)
                reference = out if reference is None else reference
                same = same and torch.equal(out, reference)
                print(f'  [{load}, {policy}] run {r + 1}/{args.repeats}: {times[-1]:.2f} s', file=sys.stderr,
                      flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        med = statistics.median(times)
        rows.append(med)
        print(f'| {load} | {policy} | {med:.2f} | {med / rows[0]:.2f} | {"yes" if same else "no"} |', flush=True)
    return 0


if __name__ == '__main__':
    start = time.time()
    code = main()
    print(f'({time.time() - start:.0f} s)', file=sys.stderr)
    sys.exit(code)
