"""Vanilla against YODA over batch sizes and seeds: train, evaluate along the way, CSV + plots.

At demo scale on a CPU (builds the demo data under --root first):

    python scripts/run_stability_experiment.py --demo --root runs/stability

At the paper's scale (64->256 faces, Table 2), on 8 GPUs per run, with the paper's data prepared
under --root:

    python scripts/run_stability_experiment.py --options options/train_sr3_yoda_64_256.yml \\
        --batch-sizes 8 16 32 --seeds 0 1 2 --iters 100000 --eval-every 10000 --nproc 8 --sampler ddpm:200

Both methods come from the one option file (YODA on/off is the only difference besides batch, seed
and budget). Rerunning continues where it stopped. Outputs under <root>/results/<prefix>/:
stability.csv (one row per run and evaluation), summary.md (mean ± std over seeds at each batch
size's last iteration, with the PSNR change over the last two evaluations: has it converged?),
stability_<metric>.png, and the generated option files.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEMO_OPTIONS = os.path.join(REPO, 'options', 'demo', 'train_sr3_yoda_demo.yml')
# Demo scale: a half-width demo network, 6 x 10-step evaluations; about 10 minutes on 2 CPU cores.
DEMO_OVERRIDES = ('network_g.base_channels=16',)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--options', help='a YODA training option file (default with --demo: the demo option file)')
    p.add_argument('--demo', action='store_true', help='build the embedded demo data under --root and use the demo '
                   f'options with {" ".join(DEMO_OVERRIDES)} unless --options/--set say otherwise')
    p.add_argument('--root', default=os.getcwd(), help='BasicSR root: datasets/ read, experiments/ and results/ '
                   'written here (default: the current folder)')
    p.add_argument('--prefix', default='stability', help='run names <prefix>_<method>_b<batch>_s<seed>')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[2, 8])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--methods', nargs='+', default=['vanilla', 'yoda'], choices=['vanilla', 'yoda'])
    p.add_argument('--iters', type=int, default=300, help='training iterations of every run (see --batch-iters)')
    p.add_argument('--batch-iters', nargs='+', default=[], metavar='BATCH=ITERS',
                   help='a budget of its own for a batch size, e.g. 2=12000 (a small batch needs more iterations '
                   'to converge); the other batch sizes train --iters')
    p.add_argument('--eval-every', type=int, default=100, help='validate (and checkpoint) every N iterations')
    p.add_argument('--sampler', default='ddpm:10', help='TYPE:STEPS[:ETA] of the evaluations (val.sampler)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='option override for every run, e.g. network_g.base_channels=16 (repeatable)')
    p.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun, --launcher pytorch)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads per run (OMP_NUM_THREADS)')
    p.add_argument('--jobs', type=int, default=1, help='runs trained at the same time (default 1; with 2 CPU '
                   'cores, --jobs 2 --threads 1 trains two runs at once)')
    p.add_argument('--force', action='store_true', help='runs under --root made with other settings are archived '
                   '(renamed *_archived_<time>) instead of refusing')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from yoda_plugin.core.samplers import SamplerConfig
    from yoda_plugin.experiments.stability import StabilityPlan, parse_batch_iters, parse_override, run_experiment
    root = os.path.abspath(args.root)
    options = args.options or (DEMO_OPTIONS if args.demo else None)
    if options is None:
        build_parser().error('give --options OPTION_FILE (a YODA training option file), or --demo')
    overrides = (list(DEMO_OVERRIDES) if args.demo and not args.options else []) + args.overrides
    try:
        sampler = SamplerConfig.from_spec(args.sampler).as_dict()
        batch_iters = parse_batch_iters(args.batch_iters)
        plan = StabilityPlan(options=os.path.abspath(options), batch_sizes=args.batch_sizes, seeds=args.seeds,
                             iters=args.iters, eval_every=args.eval_every, root=root, prefix=args.prefix,
                             methods=args.methods, sampler=sampler, nproc=args.nproc, jobs=args.jobs,
                             threads=args.threads, force=args.force, batch_iters=batch_iters,
                             overrides=dict(parse_override(o) for o in overrides))
    except ValueError as err:
        build_parser().error(str(err))
    from yoda_plugin.demo import DemoRefusal, build_demo_data
    from yoda_plugin.experiments.stability import PlanMismatch, run_resumable

    def action():
        if args.demo:
            os.makedirs(root, exist_ok=True)
            build_demo_data(root)
        run_experiment(plan)
    return run_resumable('stability', action, (DemoRefusal, PlanMismatch, RuntimeError))


if __name__ == '__main__':
    sys.exit(main())
