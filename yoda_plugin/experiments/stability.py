"""Small-batch stability: vanilla against YODA over batch sizes and seeds (the paper's Table 2 question).

For every (method, batch size, seed) the driver writes an option file derived
from one training option file (only ``yoda.enabled``, the batch size, the seed,
the budget and the evaluation cadence change), trains it through our BasicSR
runner, and reads the validation history every training run writes
(``experiments/<name>/validation_<dataset>.csv``, one row per evaluation).
It then writes one long CSV, a summary at the last iteration (mean and
standard deviation over seeds) and one plot per metric: the metric against
the iteration, one panel per batch size, the mean over seeds with its
min-max band.

Runs are resumable: a finished run (its history has the last iteration) is not
trained again; an interrupted one continues with ``--auto_resume``; a larger
``iters`` extends finished runs. ``<results>/plan.json`` records the settings
that change a run's result (the option tree of a run, less name, seed, batch and
budget) and every run made under them: a rerun with other settings is refused
with the differing keys (``force`` archives the old runs first), and a rerun with
other seeds or methods adds rows instead of replacing them.

Budgets can differ per batch size (``batch_iters``: a small batch needs more
iterations to converge). The summary reports each batch size at its own budget,
with the PSNR change over the last ``2 * eval_every`` iterations beside it: the
evidence of whether a run has converged.
"""
import copy
import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

METHODS = ('vanilla', 'yoda')
# Metrics where lower is better (the summary marks the better method per batch size).
LOWER_IS_BETTER = {'colour_shift', 'lpips', 'niqe'}


@dataclass
class StabilityPlan:
    options: str                     # training option file (YODA on or off: both methods are derived from it)
    batch_sizes: Sequence[int]
    seeds: Sequence[int]
    iters: int
    eval_every: int
    root: str                        # BasicSR root: datasets/ are resolved, experiments/ written here
    prefix: str = 'stability'
    methods: Sequence[str] = METHODS
    sampler: Optional[dict] = None   # val.sampler for the evaluations, e.g. {'type': 'ddpm', 'steps': 10}
    overrides: Dict[str, object] = field(default_factory=dict)  # dotted key -> value, applied to every run
    nproc: int = 1                   # >1: torchrun --nproc_per_node=nproc --launcher pytorch
    jobs: int = 1                    # runs trained at the same time (each with `threads` CPU threads)
    threads: Optional[int] = None    # OMP/MKL threads per run (None: the environment's)
    force: bool = False              # archive runs made with other settings instead of refusing
    batch_iters: Dict[int, int] = field(default_factory=dict)  # batch size -> its own budget (else `iters`)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f'unknown method(s) {unknown}: expected a subset of {list(METHODS)}')
        if not self.batch_sizes or not self.seeds:
            raise ValueError('give at least one batch size and one seed')
        if min(self.batch_sizes) < 1:
            raise ValueError(f'batch sizes must be >= 1, got {list(self.batch_sizes)}')
        stray = sorted(set(self.batch_iters) - set(self.batch_sizes))
        if stray:
            raise ValueError(f'batch_iters names batch size(s) {stray} that are not among the batch sizes '
                             f'{list(self.batch_sizes)}')
        for what, iters in [('iters', self.iters)] + [(f'batch_iters[{b}]', n) for b, n in self.batch_iters.items()]:
            if iters < 1 or self.eval_every < 1 or self.eval_every > iters:
                raise ValueError(f'need 1 <= eval_every ({self.eval_every}) <= {what} ({iters})')
            if iters % self.eval_every:
                raise ValueError(f'{what} ({iters}) must be a multiple of eval_every ({self.eval_every}): the last '
                                 'iteration is an evaluation')
        if self.jobs < 1:
            raise ValueError(f'jobs must be >= 1, got {self.jobs}')

    @property
    def results_dir(self) -> str:
        return os.path.join(self.root, 'results', self.prefix)

    def iters_for(self, batch: int) -> int:
        """The training budget of the runs of one batch size."""
        return int(self.batch_iters.get(batch, self.iters))

    @property
    def max_iters(self) -> int:
        return max([self.iters] + list(self.batch_iters.values()))

    def run_name(self, method: str, batch: int, seed: int) -> str:
        return f'{self.prefix}_{method}_b{batch}_s{seed}'

    def runs(self):
        for batch in self.batch_sizes:
            for seed in self.seeds:
                for method in self.methods:
                    yield method, batch, seed


def set_dotted(opt: dict, dotted: str, value):
    """``opt['a']['b'] = value`` for ``'a.b'``; every level but the last must exist (typos fail loudly)."""
    keys = dotted.split('.')
    node = opt
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f'option {".".join(keys[:depth + 1])!r} not found (from override {dotted!r})')
        node = node[key]
    if not isinstance(node, dict):
        raise KeyError(f'option {".".join(keys[:-1])!r} is not a section (from override {dotted!r})')
    node[keys[-1]] = value


def parse_override(text: str):
    """``key.sub=VALUE`` with VALUE parsed as YAML (numbers, lists, null); a clear error otherwise."""
    if '=' not in text:
        raise ValueError(f'override {text!r}: expected KEY=VALUE, e.g. network_g.base_channels=16')
    key, value = text.split('=', 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; a user means the number
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def parse_batch_iters(items: Sequence[str]) -> Dict[int, int]:
    """``['2=12000', '8=6000']`` -> ``{2: 12000, 8: 6000}``; a clear error for anything else."""
    out = {}
    for item in items:
        batch, _, iters = item.partition('=')
        try:
            out[int(batch)] = int(iters)
        except ValueError:
            raise ValueError(f'--batch-iters {item!r}: expected BATCH=ITERS, two integers, e.g. 2=12000') from None
    return out


def run_options(base: dict, plan: StabilityPlan, method: str, batch: int, seed: int) -> dict:
    """The option dict of one run: ``base`` with YODA on/off, batch, seed, budget and evaluation cadence."""
    opt = copy.deepcopy(base)
    opt.pop('yoda_plugin', None)
    for key, value in plan.overrides.items():
        set_dotted(opt, key, value)
    opt['name'] = plan.run_name(method, batch, seed)
    opt['manual_seed'] = int(seed)
    yoda = opt.get('yoda')
    if method == 'yoda' and not (yoda and yoda.get('enabled', True)):
        raise ValueError(f'{plan.options}: the yoda method needs a `yoda:` section with the attention settings; '
                         'start from a YODA training option file')
    # Vanilla keeps the same datasets (attention maps are read but unused), so both see the same batches.
    opt['yoda'] = dict(yoda, enabled=True) if method == 'yoda' else {'enabled': False}
    train_set = (opt.get('datasets') or {}).get('train')
    if train_set is None:
        raise ValueError(f'{plan.options}: no datasets.train section')
    train_set['batch_size_per_gpu'] = int(batch)
    opt['train']['total_iter'] = plan.iters_for(batch)
    opt.setdefault('path', {}).update(pretrain_network_g=None, resume_state=None)
    val = opt.get('val')
    if val is None or not val.get('metrics'):
        raise ValueError(f'{plan.options}: val.metrics is needed to evaluate the runs along the way')
    val.update(val_freq=int(plan.eval_every), save_img=False)
    if plan.sampler:
        val['sampler'] = dict(plan.sampler)
    logger = opt.setdefault('logger', {})
    logger['save_checkpoint_freq'] = int(plan.eval_every)  # resumable at every evaluation
    return opt


def history_path(plan: StabilityPlan, opt: dict) -> str:
    val_name = opt['datasets']['val']['name'] if 'val' in opt['datasets'] else next(
        v['name'] for k, v in opt['datasets'].items() if k.startswith('val'))
    return os.path.join(plan.root, 'experiments', opt['name'], f'validation_{val_name}.csv')


def read_history(path: str) -> Dict[int, dict]:
    """Iteration -> row; a resumed run's repeated iteration keeps its last row."""
    rows = {}
    if os.path.isfile(path):
        with open(path, newline='', encoding='utf-8') as f:
            for row in csv.DictReader(f):
                rows[int(row['iter'])] = {k: float(v) for k, v in row.items() if k != 'iter' and v != ''}
    return rows


def _plain(obj):
    """OrderedDicts (our loader's mappings) as dicts, which the safe dumper writes."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_yaml(path: str, opt: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write('yoda_plugin: !!python/name:yoda_plugin.__version__\n')
        yaml.safe_dump(_plain(opt), f, sort_keys=False)
    os.replace(tmp, path)


def train_command(plan: StabilityPlan, option_file: str, resume: bool) -> List[str]:
    if plan.nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={plan.nproc}',
               '-m', 'yoda_plugin', 'train', '-opt', option_file, '--launcher', 'pytorch']
    else:
        cmd = [sys.executable, '-m', 'yoda_plugin', 'train', '-opt', option_file]
    return cmd + (['--auto_resume'] if resume else [])


class PlanMismatch(ValueError):
    """A rerun whose settings differ from those the runs under this root were made with."""


# Not part of a run's settings: they vary across the runs of one plan (or only extend them).
_PER_RUN_KEYS = ('name', 'manual_seed', 'datasets.train.batch_size_per_gpu', 'train.total_iter')


def flatten(opt, prefix='') -> Dict[str, object]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists kept whole)."""
    out = {}
    for key, value in opt.items():
        dotted = f'{prefix}{key}'
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + '.'))
        else:
            out[dotted] = _plain(value)
    return out


def plan_settings(base: dict, plan: StabilityPlan) -> Dict[str, object]:
    """What changes a run's result, as dotted keys: a YODA run's options less name, seed, batch and budget."""
    settings = flatten(run_options(base, plan, 'yoda', 1, 0))
    for key in _PER_RUN_KEYS:
        settings.pop(key, None)
    settings['eval.sampler'] = _plain(plan.sampler)
    settings['nproc'] = plan.nproc
    return json.loads(json.dumps(settings, default=str))  # as plan.json will read back


def settings_diff(old: dict, new: dict) -> List[str]:
    return [f'{k}: {old.get(k, "(unset)")!r} -> {new.get(k, "(unset)")!r}'
            for k in sorted(set(old) | set(new)) if old.get(k, '(unset)') != new.get(k, '(unset)')]


def plan_file(plan: StabilityPlan) -> str:
    return os.path.join(plan.results_dir, 'plan.json')


def _write_json(path: str, data: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def archive(plan: StabilityPlan, names: Sequence[str], log=print):
    """Rename the plan's results folder and the named experiments to ``*_archived_<time>`` (nothing deleted)."""
    stamp = time.strftime('%Y%m%d_%H%M%S')
    for folder in [plan.results_dir] + [os.path.join(plan.root, 'experiments', n) for n in names]:
        if os.path.exists(folder):
            os.replace(folder, f'{folder}_archived_{stamp}')
            log(f'[{plan.prefix}] archived {folder} -> {folder}_archived_{stamp}')


def check_plan(plan: StabilityPlan, base: dict, log=print) -> dict:
    """Read or start ``plan.json``; refuse (or, with ``force``, archive) runs made with other settings."""
    settings = plan_settings(base, plan)
    path = plan_file(plan)
    record = {'settings': settings, 'runs': []}
    if os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                record = json.load(f)
            old = record['settings']
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PlanMismatch(f'{path}: unreadable ({err}); move it away or pass another --root') from err
        diff = settings_diff(old, settings)
        if diff:
            if not plan.force:
                raise PlanMismatch(f'{path}: the runs under {plan.root} were made with other settings ('
                                   + '; '.join(diff[:6]) + (f'; {len(diff) - 6} more' if len(diff) > 6 else '')
                                   + '): pass another --root, or --force to archive them and start anew')
            archive(plan, record.get('runs', []), log)
            record = {'settings': settings, 'runs': []}
    else:
        # Experiments of this plan's names that no plan.json vouches for: made by something else.
        foreign = [n for n in (plan.run_name(*r) for r in plan.runs())
                   if os.path.isdir(os.path.join(plan.root, 'experiments', n))]
        if foreign and not plan.force:
            raise PlanMismatch(f'{os.path.join(plan.root, "experiments", foreign[0])} exists but {path} does not '
                               'record it, so its settings are unknown: pass another --root, or --force to archive it')
        if foreign:
            archive(plan, foreign, log)
    _write_json(path, record)
    return record


def _progress(plan: StabilityPlan, opt: dict) -> str:
    history = read_history(history_path(plan, opt))
    if not history:
        return 'no evaluation yet'
    it = max(history)
    values = history[it]
    shown = ', '.join(f'{k} {values[k]:.3f}' for k in ('psnr', 'lr_psnr') if k in values)
    return f'iteration {it}/{opt["train"]["total_iter"]}: {shown}'


def run_plan(plan: StabilityPlan, log=print, poll_seconds: float = 30.0) -> List[dict]:
    """Train every run not finished yet (``plan.jobs`` at a time); return the long table of all recorded runs."""
    from yoda_plugin.utils.options import load_options
    base = load_options(plan.options)
    record = check_plan(plan, base, log)
    todo = list(plan.runs())
    pending, done = [], set(record['runs'])
    for i, (method, batch, seed) in enumerate(todo, 1):
        opt = run_options(base, plan, method, batch, seed)
        history = read_history(history_path(plan, opt))
        budget = plan.iters_for(batch)
        if budget in history:
            log(f'[{plan.prefix}] {i}/{len(todo)} {opt["name"]}: finished earlier, kept')
        elif history and max(history) > budget:
            raise PlanMismatch(f'{opt["name"]} went past iteration {budget} (evaluated at {max(history)}) '
                               f'without an evaluation at {budget}: give a budget of {max(history)} or more')
        else:
            pending.append((i, opt))
        done.add(opt['name'])
    record['runs'] = sorted(done)
    _write_json(plan_file(plan), record)
    env = dict(os.environ)
    if plan.threads:
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(plan.threads)
    logs = os.path.join(plan.results_dir, 'logs')
    os.makedirs(logs, exist_ok=True)
    running = []  # (opt, process, log file)

    def start(i, opt):
        option_file = os.path.join(plan.results_dir, 'options', f'{opt["name"]}.yml')
        write_yaml(option_file, opt)
        started = os.path.isdir(os.path.join(plan.root, 'experiments', opt['name'], 'training_states'))
        log_path = os.path.join(logs, f'{opt["name"]}.log')
        log(f'[{plan.prefix}] {i}/{len(todo)} {opt["name"]}: ' + ('resuming' if started else 'training')
            + f' (log: {log_path})')
        out = open(log_path, 'a', encoding='utf-8')
        proc = subprocess.Popen(train_command(plan, option_file, resume=started), cwd=plan.root, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        running.append((opt, proc, out, log_path))

    last_report = time.time()
    try:
        while pending or running:
            while pending and len(running) < plan.jobs:
                start(*pending.pop(0))
            time.sleep(min(1.0, poll_seconds))
            for item in list(running):
                opt, proc, out, log_path = item
                if proc.poll() is not None:
                    out.close()
                    running.remove(item)
                    if proc.returncode != 0:
                        raise RuntimeError(f'{opt["name"]}: training exited with code {proc.returncode}; the last '
                                           f'lines of {log_path} say why (rerun the same command to resume)')
                    log(f'[{plan.prefix}] {opt["name"]}: finished ({_progress(plan, opt)})')
            if running and time.time() - last_report >= poll_seconds:
                last_report = time.time()
                for opt, *_ in running:
                    log(f'[{plan.prefix}] {opt["name"]}: {_progress(plan, opt)}')
    finally:
        for opt, proc, out, _ in running:  # interrupted: stop the children; a rerun resumes them
            proc.terminate()
            proc.wait()
            out.close()
    rows = []
    for name in record['runs']:
        method, batch, seed = parse_run_name(plan, name)
        opt = {'name': name, 'datasets': base['datasets']}
        for it, values in sorted(read_history(history_path(plan, opt)).items()):
            if it <= (plan.iters_for(batch) if batch in plan.batch_sizes else plan.max_iters):
                rows.append({'method': method, 'batch': batch, 'seed': seed, 'iter': it, **values})
    return rows


def parse_run_name(plan: StabilityPlan, name: str):
    """``<prefix>_<method>_b<batch>_s<seed>`` -> (method, batch, seed)."""
    method, batch, seed = name[len(plan.prefix) + 1:].rsplit('_', 2)
    return method, int(batch[1:]), int(seed[1:])


def summarize(rows: List[dict], metrics: Sequence[str]) -> Dict[tuple, dict]:
    """(method, batch, iter) -> {metric: (mean, std, min, max, n)} over seeds (population std)."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row['method'], row['batch'], row['iter'])].append(row)
    out = {}
    for key, group in groups.items():
        stats = {}
        for metric in metrics:
            values = [r[metric] for r in group if metric in r]
            if values:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
                stats[metric] = (mean, std, min(values), max(values), len(values))
        out[key] = stats
    return out


def metric_names(rows: List[dict]) -> List[str]:
    skip = {'method', 'batch', 'seed', 'iter', 'sec_per_image', 'sparse_pixels'}
    names = []
    for row in rows:
        names += [k for k in row if k not in skip and k not in names]
    return names


def write_table(rows: List[dict], path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = ['method', 'batch', 'seed', 'iter'] + [k for k in metric_names(rows) + ['sec_per_image']
                                                   if any(k in r for r in rows)]
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    return path


def final_table(rows: List[dict], iters, window: int = 0) -> str:
    """Markdown: per batch size and method, mean ± std over seeds at the run's budget.

    ``iters`` is one budget or a mapping batch size -> budget. With ``window`` > 0 a last column gives the PSNR
    change from iteration ``budget - window`` to the budget (mean ± std over seeds): near 0 once a run has
    converged."""
    budget = (lambda b: int(iters.get(b, 0))) if isinstance(iters, dict) else (lambda b: int(iters))
    metrics = metric_names(rows)
    stats = summarize([r for r in rows if r['iter'] == budget(r['batch'])], metrics)
    psnr_at = {(r['method'], r['batch'], r['seed'], r['iter']): r['psnr'] for r in rows if 'psnr' in r}
    show_change = window > 0 and bool(psnr_at)
    lines = ['| batch | method | seeds | iteration | ' + ' | '.join(metrics)
             + (f' | PSNR change over the last {window} iterations |' if show_change else ' |'),
             '|---|---|---|---|' + '---|' * (len(metrics) + show_change)]
    for batch in sorted({b for _, b, _ in stats}):
        end = budget(batch)
        for method in METHODS:
            s = stats.get((method, batch, end))
            if not s:
                continue
            n = max(v[4] for v in s.values())
            cells = [f'{s[m][0]:.4f} ± {s[m][1]:.4f}' if m in s else '-' for m in metrics]
            if show_change:
                changes = [psnr_at[(method, batch, seed, end)] - psnr_at[(method, batch, seed, end - window)]
                           for (m, b, seed, it) in psnr_at if (m, b, it) == (method, batch, end)
                           and (method, batch, seed, end - window) in psnr_at]
                if changes:
                    mean = sum(changes) / len(changes)
                    std = (sum((c - mean) ** 2 for c in changes) / len(changes)) ** 0.5
                    cells.append(f'{mean:+.4f} ± {std:.4f}')
                else:
                    cells.append('-')
            lines.append(f'| {batch} | {method} | {n} | {end} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(rows: List[dict], out_dir: str) -> List[str]:
    """One PNG per metric: metric against iteration, a panel per batch size, mean over seeds and min-max band."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('the stability plots need matplotlib: pip install matplotlib '
                          '(or pip install -e .[plots])') from err
    metrics = metric_names(rows)
    stats = summarize(rows, metrics)
    batches = sorted({b for _, b, _ in stats})
    paths = []
    for metric in metrics:
        fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.2), squeeze=False, sharey=True)
        for ax, batch in zip(axes[0], batches):
            for method, colour in zip(METHODS, ('tab:red', 'tab:blue')):
                points = sorted((it, s[metric]) for (m, b, it), s in stats.items()
                                if m == method and b == batch and metric in s)
                if not points:
                    continue
                its = [p[0] for p in points]
                ax.plot(its, [p[1][0] for p in points], color=colour, marker='o', label=method)
                ax.fill_between(its, [p[1][2] for p in points], [p[1][3] for p in points], color=colour, alpha=0.2)
            ax.set_title(f'batch {batch}')
            ax.set_xlabel('iteration')
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric + (' (lower is better)' if metric in LOWER_IS_BETTER else ''))
        axes[0][-1].legend()
        fig.suptitle(f'{metric}: mean over seeds, band = min..max')
        fig.tight_layout()
        path = os.path.join(out_dir, f'stability_{metric}.png')
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_experiment(plan: StabilityPlan, log=print) -> dict:
    """Train what is missing, then write ``stability.csv``, ``summary.md`` and the plots; return their paths."""
    rows = run_plan(plan, log=log)
    os.makedirs(plan.results_dir, exist_ok=True)
    table = write_table(rows, os.path.join(plan.results_dir, 'stability.csv'))
    budgets = {b: plan.iters_for(b) for b in plan.batch_sizes}
    summary = final_table(rows, budgets, window=2 * plan.eval_every)
    summary_path = os.path.join(plan.results_dir, 'summary.md')
    seeds = sorted({r['seed'] for r in rows})
    at = ', '.join(f'batch {b} at iteration {n}' for b, n in budgets.items())
    with open(summary_path, 'w', encoding='utf-8') as f:
        f.write(f'Stability, {at} (mean ± std over seeds {seeds}), from {plan.options}\n\n{summary}\n')
    plots = plot(rows, plan.results_dir)
    log(f'\n[stability] {at}, mean ± std over seeds {seeds}:\n{summary}')
    log(f'[stability] long table: {table}\n[stability] summary: {summary_path}')
    for path in plots:
        log(f'[stability] plot: {path}')
    return {'table': table, 'summary': summary_path, 'plots': plots, 'rows': rows}


def run_resumable(tag: str, action, errors: tuple) -> int:
    """A driver's exit status: 0 when ``action()`` finishes; 2 with one ``[tag] error:`` line for the refusals
    in ``errors``; 130 on Ctrl-C, saying that the same command resumes."""
    try:
        action()
    except errors as err:
        print(f'[{tag}] error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'[{tag}] interrupted: rerun the same command to resume', file=sys.stderr)
        return 130
    return 0
