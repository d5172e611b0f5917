#!/usr/bin/env python
"""Learning curves: vanilla SR3 against SR3 + YODA on the demo data, one budget, several seeds.

    python scripts/benchmark_convergence.py --root runs/convergence --iters 8000 --eval-every 500 \\
        --seeds 0 1 --jobs 2 --threads 1 [--export yoda_plugin/weights]

Trains every (method, seed) run through our BasicSR runner (the demo's option files; only YODA and the
seed differ), validates the EMA weights every --eval-every iterations, and writes under
<root>/results/convergence/: convergence.csv, convergence.md (last-iteration table and the first
iteration within 1 dB of bicubic), convergence.png, logs/ and plan.json. Progress is printed every
30 s; rerunning the same command resumes (a larger --iters extends finished runs); other settings
under the same root are refused (--force archives the old runs). --export writes seed 0's final EMA
weights as self-describing checkpoints (the demo's shipped models).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default=os.path.join(os.getcwd(), 'runs', 'convergence'),
                   help='working folder: datasets/demo, experiments/, results/convergence/ (default: runs/convergence)')
    p.add_argument('--iters', type=int, default=8000)
    p.add_argument('--eval-every', type=int, default=500)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--methods', nargs='+', default=['vanilla', 'yoda'], choices=['vanilla', 'yoda'])
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--sampler', default='ddpm:20', help='TYPE:STEPS[:ETA] of the evaluations (default ddpm:20)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='option override for every run (repeatable), e.g. train.optim_g.lr=1e-4')
    p.add_argument('--jobs', type=int, default=2, help='runs trained at once (default 2)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads per run (default 1)')
    p.add_argument('--force', action='store_true', help='archive runs made with other settings instead of refusing')
    p.add_argument('--export', metavar='DIR', help="write seed --export-seed's final EMA weights to DIR as "
                   'demo_sr3_x4.pth and demo_sr3_yoda_x4.pth')
    p.add_argument('--export-seed', type=int, default=0)
    p.add_argument('--overwrite-export', action='store_true', help='replace existing files in --export DIR')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from yoda_plugin.core.samplers import SamplerConfig
    from yoda_plugin.demo import DemoRefusal
    from yoda_plugin.experiments.convergence import ConvergencePlan, ForeignRoot, run_benchmark
    from yoda_plugin.experiments.stability import PlanMismatch, parse_override, run_resumable
    try:
        plan = ConvergencePlan(root=os.path.abspath(args.root), iters=args.iters, eval_every=args.eval_every,
                               seeds=args.seeds, methods=args.methods, batch=args.batch,
                               sampler=SamplerConfig.from_spec(args.sampler).as_dict(), jobs=args.jobs,
                               threads=args.threads, force=args.force,
                               overrides=dict(parse_override(o) for o in args.overrides))
        plan.stability_plan()  # validates the numbers
    except ValueError as err:
        build_parser().error(str(err))
    if args.export and args.export_seed not in args.seeds:
        build_parser().error(f'--export-seed {args.export_seed} is not among --seeds {args.seeds}')
    def action():
        run_benchmark(plan, export_dir=args.export, export_seed=args.export_seed, overwrite_export=args.overwrite_export)
    return run_resumable('convergence', action, (ForeignRoot, PlanMismatch, DemoRefusal, FileExistsError, RuntimeError))


if __name__ == '__main__':
    sys.exit(main())
