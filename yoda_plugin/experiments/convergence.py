"""Learning curves of the demo models: vanilla SR3 against SR3 + YODA on one budget, over seeds.

Builds on the stability driver (:mod:`.stability`: one option file, runs that
differ only in YODA and seed, resumable, fingerprinted in ``plan.json``) with
the demo's data and options, and adds what a convergence study needs:

- the bicubic baseline on the same validation crops;
- per method, the iteration at which the mean curve (and each seed) first comes
  within 1 dB PSNR of bicubic;
- ``convergence.csv`` (one row per run and evaluation), ``convergence.md`` and
  ``convergence.png`` (PSNR, SSIM, colour shift, LR-PSNR against iteration,
  mean over seeds with the min-max band, bicubic as a line);
- ``export``: the EMA weights of one seed's last checkpoint as self-describing
  checkpoints (:func:`export_checkpoint`), the files the demo ships.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from . import stability

WITHIN_DB = 1.0  # "converged enough": PSNR within this many dB of bicubic
CURVE_METRICS = ('psnr', 'ssim', 'colour_shift', 'lr_psnr')
LABELS = {'vanilla': 'SR3', 'yoda': 'SR3 + YODA'}
EXPORT_NAMES = {'vanilla': 'demo_sr3_x4.pth', 'yoda': 'demo_sr3_yoda_x4.pth'}


class ForeignRoot(ValueError):
    """The root holds files that neither this driver nor the demo made."""


@dataclass
class ConvergencePlan:
    root: str
    iters: int = 8000
    eval_every: int = 500
    seeds: Sequence[int] = (0, 1)
    methods: Sequence[str] = stability.METHODS
    batch: int = 4
    sampler: Dict[str, object] = field(default_factory=lambda: {'type': 'ddpm', 'steps': 20, 'eta': 0.0})
    jobs: int = 1
    threads: Optional[int] = None
    force: bool = False
    overrides: Dict[str, object] = field(default_factory=dict)
    options: Optional[str] = None  # default: the demo's YODA training options

    def stability_plan(self) -> stability.StabilityPlan:
        from yoda_plugin.demo import options_dir
        options = self.options or os.path.join(options_dir(), 'train_sr3_yoda_demo.yml')
        return stability.StabilityPlan(
            options=options, batch_sizes=[self.batch], seeds=list(self.seeds), iters=self.iters,
            eval_every=self.eval_every, root=self.root, prefix='convergence', methods=list(self.methods),
            sampler=dict(self.sampler), overrides=dict(self.overrides), jobs=self.jobs, threads=self.threads,
            force=self.force)


def check_root(root: str):
    """A new or empty root, or one this driver (plan.json) or the demo (its manifest) made."""
    from yoda_plugin.demo import MANIFEST
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise ForeignRoot(f'--root {root} is a file, expected a folder')
        return
    entries = [e for e in os.listdir(root) if not e.startswith('.')]
    ours = os.path.isfile(os.path.join(root, 'results', 'convergence', 'plan.json')) or \
        os.path.isfile(os.path.join(root, MANIFEST))
    if entries and not ours:
        raise ForeignRoot(f'--root {root} holds {len(entries)} entries (e.g. {sorted(entries)[0]!r}) that this '
                          'benchmark did not make: give an empty or new folder (or one an earlier run of this '
                          'benchmark or the demo made)')


def first_within(points: Dict[int, float], target: float) -> Optional[int]:
    """The first iteration whose value is >= target (None if none)."""
    for it in sorted(points):
        if points[it] >= target:
            return it
    return None


def curves(rows: List[dict]) -> Dict[str, Dict[int, Dict[str, tuple]]]:
    """method -> iteration -> metric -> (mean, std, min, max, n) over seeds."""
    stats = stability.summarize(rows, list(CURVE_METRICS))
    out: Dict[str, Dict[int, Dict[str, tuple]]] = {}
    for (method, _batch, it), values in stats.items():
        out.setdefault(method, {})[it] = values
    return out


def summary_table(rows: List[dict], bicubic: dict, iters: int) -> str:
    """Markdown: last-iteration mean ± std per method, bicubic, and the first iteration within 1 dB."""
    by_method = curves(rows)
    target = bicubic['psnr'] - WITHIN_DB
    head = '| method | seeds | ' + ' | '.join(CURVE_METRICS) + f' | first iteration within {WITHIN_DB:g} dB ' \
        '(mean curve; per seed) |'
    lines = [head, '|---|---|' + '---|' * len(CURVE_METRICS) + '---|',
             '| bicubic | - | ' + ' | '.join(f'{bicubic[m]:.4f}' for m in CURVE_METRICS) + ' | - |']
    for method in stability.METHODS:
        curve = by_method.get(method, {})
        last = curve.get(iters)
        if not last:
            continue
        mean_first = first_within({it: v['psnr'][0] for it, v in curve.items()}, target)
        seeds = sorted({r['seed'] for r in rows if r['method'] == method and r['iter'] == iters})
        per_seed = [first_within({r['iter']: r['psnr'] for r in rows if r['method'] == method and r['seed'] == s},
                                 target) for s in seeds]
        cells = [f'{last[m][0]:.4f} ± {last[m][1]:.4f}' if m in last else '-' for m in CURVE_METRICS]
        firsts = f'{mean_first if mean_first is not None else "not reached"}; ' + ', '.join(
            f's{s}: {f if f is not None else "-"}' for s, f in zip(seeds, per_seed))
        lines.append(f'| {LABELS[method]} | {len(seeds)} | ' + ' | '.join(cells) + f' | {firsts} |')
    return '\n'.join(lines)


def plot_curves(rows: List[dict], bicubic: dict, path: str) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    by_method = curves(rows)
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.4))
    for ax, metric in zip(axes, CURVE_METRICS):
        for method, colour in zip(stability.METHODS, ('tab:red', 'tab:blue')):
            points = sorted((it, v[metric]) for it, v in by_method.get(method, {}).items() if metric in v)
            if not points:
                continue
            its = [p[0] for p in points]
            ax.plot(its, [p[1][0] for p in points], color=colour, marker='.', label=LABELS[method])
            ax.fill_between(its, [p[1][2] for p in points], [p[1][3] for p in points], color=colour, alpha=0.2)
        ax.axhline(bicubic[metric], color='k', linestyle='--', linewidth=1, label='bicubic')
        if metric == 'psnr':
            ax.axhline(bicubic[metric] - WITHIN_DB, color='grey', linestyle=':', linewidth=1,
                       label=f'bicubic - {WITHIN_DB:g} dB')
        ax.set_title(metric + (' (lower is better)' if metric in stability.LOWER_IS_BETTER else ''))
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = sorted({r['seed'] for r in rows})
    fig.suptitle(f'Demo learning curves (mean over seeds {seeds}, band = min..max)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_checkpoint(plan: stability.StabilityPlan, method: str, seed: int, out_path: str,
                      overwrite: bool = False) -> str:
    """The EMA weights of a run's last checkpoint plus the record that rebuilds its network and pipeline.

    The file keeps BasicSR's layout (``params_ema``), so BasicSR's own ``load_network`` reads it; the
    ``yoda_record`` beside it holds the options, how the weights were made and their validation metrics.
    """
    import torch

    from yoda_plugin.utils.options import load_options
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f'{out_path} exists: pass --overwrite-export to replace it')
    base = load_options(plan.options)
    opt = stability.run_options(base, plan, method, plan.batch_sizes[0], seed)
    exp = os.path.join(plan.root, 'experiments', opt['name'])
    source = os.path.join(exp, 'models', f'net_g_{plan.iters}.pth')
    if not os.path.isfile(source):
        raise FileNotFoundError(f'{source} does not exist: run the benchmark to iteration {plan.iters} first')
    state = torch.load(source, map_location='cpu', weights_only=True)
    history = stability.read_history(stability.history_path(plan, opt))
    record = checkpoint_record(opt, plan, method, seed, history.get(plan.iters, {}))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    from yoda_plugin.models.checkpoint import atomic_torch_save
    atomic_torch_save({'params_ema': state['params_ema'], 'yoda_record': record}, out_path)
    # A reproducible check beside the weights: one validation image, its SR's PSNR with a fixed seed.
    lr, hr = check_image(plan.root)
    record['check'] = dict(CHECK, lr=torch.from_numpy(lr), hr=torch.from_numpy(hr),
                           psnr=check_psnr(out_path, method, lr, hr))
    atomic_torch_save({'params_ema': state['params_ema'], 'yoda_record': record}, out_path)
    return out_path


def demo_test_options(method: str) -> str:
    """The demo's test option file of ``method`` (how its shipped checkpoint is sampled)."""
    from yoda_plugin.demo import options_dir
    return os.path.join(options_dir(), 'test_sr3_yoda_demo.yml' if method == 'yoda' else 'test_sr3_demo.yml')


# The check every shipped checkpoint records: one thread (float sums depend on the thread count), seed 0.
CHECK = {'sampler': {'type': 'ddpm', 'steps': 20, 'eta': 0.0}, 'seed': 0, 'threads': 1}


def check_image(root: str):
    """The first validation crop of the demo data: (LR, HR) uint8 RGB."""
    import cv2
    import numpy as np
    folder = os.path.join(root, 'datasets', 'demo')
    key = sorted(os.listdir(os.path.join(folder, 'val_hr')))[0]
    lr, hr = (np.ascontiguousarray(cv2.imread(os.path.join(folder, f'val_{k}', key))[:, :, ::-1]) for k in ('lr', 'hr'))
    return lr, hr


def check_psnr(checkpoint: str, method: str, lr, hr) -> float:
    """PSNR (RGB, crop border 4) of ``checkpoint``'s SR of ``lr`` against ``hr`` under :data:`CHECK`."""
    import torch
    from basicsr.metrics.psnr_ssim import calculate_psnr

    from yoda_plugin.inference import YODAResolver
    test_file = demo_test_options(method)
    threads = torch.get_num_threads()
    torch.set_num_threads(CHECK['threads'])
    try:
        resolver = YODAResolver.from_options(test_file, checkpoint=checkpoint, device='cpu', sampler=CHECK['sampler'])
        sr = resolver(lr, seed=CHECK['seed'])
    finally:
        torch.set_num_threads(threads)
    return float(calculate_psnr(sr, hr, crop_border=4, input_order='HWC'))


def checkpoint_record(opt: dict, plan: stability.StabilityPlan, method: str, seed: int, metrics: dict) -> dict:
    """What rebuilding the network and pipeline needs, and how the weights were made (plain types only)."""
    from yoda_plugin.checkpoints.record import make_record  # the one schema (format 1)
    val = opt['datasets']['val']
    # The record says how to sample the weights: the demo's test sampler (docs/samplers.md), not the
    # validation sampler of the learning curves.
    from yoda_plugin.utils.options import load_options
    sampler = load_options(demo_test_options(method))['val']['sampler']
    opt = dict(opt, val=dict(opt.get('val') or {}, sampler=sampler))
    return make_record(
        opt,
        training={'iterations': plan.iters, 'seed': seed, 'batch': plan.batch_sizes[0], 'method': method,
                  'yoda_trained': method == 'yoda', 'options': os.path.basename(plan.options),
                  'command': 'python scripts/benchmark_convergence.py (docs/convergence.md)'},
        validation={'dataset': val['name'], 'iteration': plan.iters, 'sampler': dict(plan.sampler), **metrics})


def run_benchmark(plan: ConvergencePlan, log=print, export_dir: Optional[str] = None, export_seed: int = 0,
                  overwrite_export: bool = False) -> dict:
    from yoda_plugin.demo import bicubic_baseline, build_demo_data
    check_root(plan.root)
    os.makedirs(plan.root, exist_ok=True)
    build_demo_data(plan.root)
    splan = plan.stability_plan()
    rows = stability.run_plan(splan, log=log)
    out = splan.results_dir
    from yoda_plugin.utils.options import load_options
    base = load_options(splan.options)
    bicubic = bicubic_baseline(plan.root, base['val']['metrics'])
    with open(os.path.join(out, 'bicubic.json'), 'w', encoding='utf-8') as f:
        json.dump(bicubic, f, indent=1)
    table = stability.write_table(rows, os.path.join(out, 'convergence.csv'))
    summary = summary_table(rows, bicubic, plan.iters)
    seeds = sorted({r['seed'] for r in rows})
    summary_path = os.path.join(out, 'convergence.md')
    with open(summary_path, 'w', encoding='utf-8') as f:
        f.write(f'Demo learning curves: batch {plan.batch}, seeds {seeds}, {plan.iters} iterations, validation '
                f'every {plan.eval_every} with {plan.sampler["type"]}:{plan.sampler["steps"]} on the EMA weights; '
                f'at iteration {plan.iters} (mean ± std over seeds):\n\n{summary}\n')
    figure = plot_curves(rows, bicubic, os.path.join(out, 'convergence.png'))
    log(f'\n[convergence] at iteration {plan.iters} (mean ± std over seeds {seeds}):\n{summary}')
    log(f'[convergence] curves: {table}\n[convergence] summary: {summary_path}\n[convergence] plot: {figure}')
    exported = []
    if export_dir:
        for method in plan.methods:
            path = export_checkpoint(splan, method, export_seed, os.path.join(export_dir, EXPORT_NAMES[method]),
                                     overwrite=overwrite_export)
            log(f'[convergence] exported {LABELS[method]} (seed {export_seed}, iteration {plan.iters}): {path}')
            exported.append(path)
    return {'table': table, 'summary': summary_path, 'plot': figure, 'rows': rows, 'bicubic': bicubic,
            'exported': exported}
