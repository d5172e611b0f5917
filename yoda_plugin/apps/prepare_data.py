"""The paper's data preparation: ``scripts/prepare_data.py`` (``python -m yoda_plugin prepare``), whose
docstring is the user documentation.

* Recipes: :func:`face_jobs` (FFHQ / CelebA-HQ: ``<root>/FFHQ/lr_16.lmdb``, ``hr_128.lmdb``, ...) and
  :func:`df2k_jobs` (``<root>/DF2K/DF2K_HR_sub320.lmdb`` ..., ``<root>/DIV2K/DIV2K_valid_*.lmdb``): which image
  LMDBs, made how, under the names the option files read; attention LMDBs ``attention_<tag>_<lr>.lmdb`` on each
  LR LMDB (:func:`parse_attention_spec`).
* Running: :func:`run_plan` runs the image jobs (:func:`yoda_plugin.data.prepare.run_image_job`), then the
  attention jobs (:func:`yoda_plugin.attention.precompute.run`, an attention LMDB marked complete with the
  fingerprint of its LR LMDB), then prints a summary.
* The command line: :func:`build_parser`, :func:`main` (exit status 0; 1 when an image or map failed; 2 for a
  usage or setup error and a full disk, one line ``error: ...``).

The image workers are started before any attention source runs, so no torch thread pool exists when they fork.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb

from yoda_plugin.attention import ATTENTION_SOURCES, build_attention_source, parse_source_opts
from yoda_plugin.attention import precompute
from yoda_plugin.data.prepare import (COMPLETE_FILE, DF2K_SCALE, FORMAT, SUB_SIZE, SUB_STEP, SUB_THRESH,
                                      ImageJob, ImageTarget, InputImage, UsageError, describe_lmdb, folder_bytes,
                                      human_bytes, list_images, lmdb_keys, read_json, refuse_output_inside_input,
                                      run_image_job, check_layout, write_json)
from yoda_plugin.utils.disk import DISK_FULL_EXIT_CODE, DiskFullError, disk_full_error
from yoda_plugin.utils.fingerprint import archive

#: face scenarios: name -> (LR size, HR size), as in options/{train,test}_sr3*.yml
FACE_SCENARIOS = {'16_128': (16, 128), '64_256': (64, 256), '64_512': (64, 512)}


@dataclass
class AttentionJob:
    """An attention source run on the LR LMDB ``lr_path`` into ``path``."""
    name: str
    source: str
    source_opts: dict
    lr_path: str
    path: str


@dataclass
class Plan:
    image_jobs: List[ImageJob]
    attention_jobs: List[AttentionJob]
    roots: List[str]  # dataset folders, for the disk total


@dataclass
class Report:
    """What a run did, for the summary."""
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stages: List[Tuple[str, str, float]] = field(default_factory=list)  # (stage, what happened, seconds)
    attention_status: int = 0


def _parameters(cls) -> dict:
    import inspect
    return inspect.signature(cls.__init__).parameters


def parse_attention_spec(spec: str) -> Tuple[str, dict, str]:
    """``SOURCE[:HEADS]`` -> (source name, options, LMDB tag): ``dino_resnet50:max`` -> tag ``dino_resnet50_max``,
    ``dino_vits8:3`` -> ``dino_vits8_head3``, ``edge`` -> ``edge`` (the names of options/ and options/ablation/)."""
    precompute.load_attention_sources()
    name, sep, heads = spec.partition(':')
    if name not in ATTENTION_SOURCES:
        raise UsageError(f'--attention {spec}: unknown source {name!r}; known: {", ".join(sorted(ATTENTION_SOURCES))}')
    takes_heads = 'heads' in _parameters(ATTENTION_SOURCES[name])
    if not sep:
        if takes_heads:
            raise UsageError(f'--attention {spec}: {name} needs its heads, e.g. {name}:max, {name}:avg or {name}:0')
        return name, {}, name
    if not takes_heads:
        raise UsageError(f'--attention {spec}: source {name!r} has no heads; write just {name}')
    value = int(heads) if heads.isdigit() else heads
    tag = f'{name}_head{value}' if isinstance(value, int) else f'{name}_{value}'
    return name, {'heads': value}, tag


def face_jobs(input_dir: str, root: str, scenarios: Sequence[str] = tuple(FACE_SCENARIOS), val: bool = False,
              name: Optional[str] = None, limit: Optional[int] = None, compress_level: int = 1,
              attention: Sequence[str] = (), attention_opts: Optional[Dict[str, dict]] = None) -> Plan:
    """The jobs of ``prepare_data.py faces``."""
    unknown = [s for s in scenarios if s not in FACE_SCENARIOS]
    if unknown or not scenarios:
        raise UsageError(f'--scenarios: unknown {unknown}; choose from {", ".join(FACE_SCENARIOS)}')
    folder = os.path.join(root, name or ('CelebA-HQ' if val else 'FFHQ'))
    refuse_output_inside_input([folder], [input_dir])
    inputs = list_images(input_dir)[:limit] if limit else list_images(input_dir)
    lr_sizes = sorted({FACE_SCENARIOS[s][0] for s in scenarios})
    hr_sizes = sorted({FACE_SCENARIOS[s][1] for s in scenarios})
    sizes = [('lr', s) for s in lr_sizes] + [('hr', s) for s in hr_sizes]
    recipe = {'format': FORMAT, 'scenario': 'faces', 'resize': 'sr3: Pillow bicubic, short side, centre crop'}
    targets = [ImageTarget(os.path.join(folder, f'{role}_{s}.lmdb'), {**recipe, 'size': s}) for role, s in sizes]
    job = ImageJob(f'{os.path.basename(folder)} faces', 'faces', inputs, targets,
                   {'sizes': [s for _, s in sizes], 'compress_level': compress_level})
    att = []
    for spec in attention:
        source, opts, tag = parse_attention_spec(spec)
        opts = {**(attention_opts or {}).get(source, {}), **opts}
        for s in lr_sizes:
            att.append(AttentionJob(f'{os.path.basename(folder)} {tag} on lr_{s}', source, opts,
                                    os.path.join(folder, f'lr_{s}.lmdb'),
                                    os.path.join(folder, f'attention_{tag}_{s}.lmdb')))
    return Plan([job], att, [folder])


def df2k_jobs(train_dirs: Sequence[str], val_dirs: Sequence[str], root: str, limit: Optional[int] = None,
              compress_level: int = 1, attention: Sequence[str] = (),
              attention_opts: Optional[Dict[str, dict]] = None) -> Plan:
    """The jobs of ``prepare_data.py df2k``: DF2K training sub-images and/or DIV2K validation images."""
    if not train_dirs and not val_dirs:
        raise UsageError('df2k needs --train-hr (DIV2K_train_HR, Flickr2K_HR) and/or --val-hr (DIV2K_valid_HR)')
    jobs, roots, att = [], [], []
    specs = [parse_attention_spec(spec) for spec in attention]
    recipe = {'format': FORMAT, 'scale': DF2K_SCALE,
              'resize': 'matlab bicubic on uint8 (rounded per pass) of the mod-4 HR'}
    for split, dirs in (('train', train_dirs), ('val', val_dirs)):
        if not dirs:
            continue
        folder = os.path.join(root, 'DF2K' if split == 'train' else 'DIV2K')
        refuse_output_inside_input([folder], dirs)
        inputs: Dict[str, InputImage] = {}
        for d in dirs:
            for item in list_images(d, recursive=False):
                if item.key in inputs:
                    raise UsageError(f'{inputs[item.key].path} and {item.path} have the same key {item.key!r}')
                inputs[item.key] = item
        items = [inputs[k] for k in sorted(inputs)]
        items = items[:limit] if limit else items
        if split == 'train':
            sub = {'sub_size': SUB_SIZE, 'sub_step': SUB_STEP, 'sub_thresh': SUB_THRESH}
            targets = [ImageTarget(os.path.join(folder, 'DF2K_HR_sub320.lmdb'), {**recipe, **sub, 'role': 'hr'}),
                       ImageTarget(os.path.join(folder, 'DF2K_LR_bicubic_X4_sub80.lmdb'),
                                   {**recipe, **sub, 'role': 'lr'})]
            jobs.append(ImageJob('DF2K train sub-images', 'df2k_train', items, targets,
                                 {'compress_level': compress_level}))
            lr_tag = 'sub80'
        else:
            targets = [ImageTarget(os.path.join(folder, 'DIV2K_valid_HR.lmdb'),
                                   {**recipe, 'role': 'hr', 'whole': True}),
                       ImageTarget(os.path.join(folder, 'DIV2K_valid_LR_bicubic_X4.lmdb'),
                                   {**recipe, 'role': 'lr', 'whole': True})]
            jobs.append(ImageJob('DIV2K validation', 'div2k_val', items, targets, {'compress_level': compress_level}))
            lr_tag = 'valid_X4'
        roots.append(folder)
        for source, opts, tag in specs:
            opts = {**(attention_opts or {}).get(source, {}), **opts}
            att.append(AttentionJob(f'{os.path.basename(folder)} {tag} on {lr_tag}', source, opts, targets[1].path,
                                    os.path.join(folder, f'attention_{tag}_{lr_tag}.lmdb')))
    return Plan(jobs, att, roots)


# --------------------------------------------------------------------------- attention

def preflight_attention(jobs: Sequence[AttentionJob]) -> None:
    """Fail before any image work when a source cannot be built: DINO weights must exist locally.

    DINO sources are only located (weights path), not built: building them runs torch code, which must not
    happen before the image workers fork. Deterministic sources are built (cheap) to check their options.
    """
    from yoda_plugin.attention.dino import WEIGHTS_ENV_VARS, resolve_weights
    for job in {(j.source, json.dumps(j.source_opts, sort_keys=True)): j for j in jobs}.values():
        try:
            if job.source in WEIGHTS_ENV_VARS:
                resolve_weights(job.source, job.source_opts.get('weights'))
            else:
                build_attention_source(job.source, **job.source_opts)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f'attention source {job.source}: {err}') from None


def run_attention_job(job: AttentionJob, device: Optional[str] = None, batch_size: int = 8,
                      show_progress: bool = True, force: bool = False) -> Tuple[str, int]:
    """Run the precompute library on ``job`` unless its marker says it is complete for the current LR LMDB
    (``force``: maps made with other settings are archived instead of refused).

    Returns (what happened, status 0 / 1 / 2 as precompute's)."""
    lr_marker = read_json(os.path.join(job.lr_path, COMPLETE_FILE))
    wanted = {'lr_fingerprint': lr_marker['fingerprint'] if lr_marker else None, 'source': job.source,
              'source_opts': job.source_opts}
    found = read_json(os.path.join(job.path, COMPLETE_FILE))
    if lr_marker is not None and found is not None and \
            {k: found.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
        return f'complete already ({found.get("keys")} maps), nothing to do', 0
    if not os.path.isfile(os.path.join(job.lr_path, 'data.mdb')):
        return f'skipped: {job.lr_path} holds no images', 1
    config = precompute.PrecomputeConfig(input=job.lr_path, output=job.path, source=job.source,
                                         source_opts=dict(job.source_opts), device=device, batch_size=batch_size,
                                         map_size=64 * 1024 ** 2, commit_every=64, preview_count=0,
                                         show_progress=show_progress, force=force)
    try:
        config.check()
        status = precompute.run(config)
    except precompute.SETUP_ERRORS as err:
        return f'error: {" ".join(str(err).split())}', 2
    if status == 0 and lr_marker is not None:
        keys = len(lmdb_keys(job.path))
        write_json(os.path.join(job.path, COMPLETE_FILE), {**wanted, 'keys': keys,
                                                         'finished_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                                                       time.gmtime())})
    return ('maps written' if status == 0 else 'some maps failed'), status


def run_plan(plan: Plan, workers: int = 2, commit_every: int = 16, device: Optional[str] = None,
             attention_batch: int = 8, show_progress: bool = True, log=print, force: bool = False) -> int:
    """Every image job, then every attention job, then the summary. Exit status: 0; 1 when an image or a map
    failed (the rest is written); 2 for a setup error. ``force``: LMDBs made with other settings are archived and
    made afresh instead of refused, and so are the attention maps of an archived LR LMDB."""
    start = time.perf_counter()
    preflight_attention(plan.attention_jobs)
    report, archived = Report(), []
    for job in plan.image_jobs:
        t0 = time.perf_counter()
        log(f'[prepare] {job.name}: {len(job.inputs)} input image(s) -> {", ".join(t.path for t in job.targets)}')
        what, failed = run_image_job(job, workers, commit_every, show_progress, log=log, force=force,
                                     archived=archived)
        report.failed += failed
        report.stages.append((job.name, what, time.perf_counter() - t0))
        log(f'[prepare] {job.name}: {what} ({time.perf_counter() - t0:.1f} s)')
    for job in plan.attention_jobs:
        t0 = time.perf_counter()
        log(f'[prepare] attention {job.name}: {job.lr_path} -> {job.path}')
        if job.lr_path in archived and os.path.exists(job.path):  # its maps are of the archived LR images
            log(f'[prepare] --force: archived {job.path} to {archive(job.path)} with its LR LMDB')
        what, status = run_attention_job(job, device, attention_batch, show_progress, force)
        report.attention_status = max(report.attention_status, status)
        report.stages.append((f'attention {job.name}', what, time.perf_counter() - t0))
        log(f'[prepare] attention {job.name}: {what} ({time.perf_counter() - t0:.1f} s)')

    log('')
    log('[prepare] summary')
    paths = [t.path for j in plan.image_jobs for t in j.targets] + [j.path for j in plan.attention_jobs]
    width = max(len(p) for p in paths) if paths else 0
    for path in paths:
        log(f'  {path:<{width}}  {describe_lmdb(path)}')
    total = sum(folder_bytes(r) for r in plan.roots if os.path.isdir(r))
    log(f'  disk used under {", ".join(plan.roots)}: {human_bytes(total)}; {time.perf_counter() - start:.1f} s')
    if report.failed:
        log(f'[prepare] {len(report.failed)} input image(s) skipped:')
        for path, reason in report.failed:
            log(f'  {path}: {reason}')
    if report.attention_status:
        log('[prepare] some attention maps failed or could not be made (see above)')
    return max(1 if report.failed else 0, report.attention_status)


# --------------------------------------------------------------------------- command line

def _attention_opts(pairs: Iterable[str]) -> Dict[str, dict]:
    """``['dino_resnet50.weights=/w.pth', ...]`` -> {source: {key: value}} (values as precompute parses them)."""
    by_source: Dict[str, List[str]] = {}
    for pair in pairs or []:
        head, sep, _ = pair.partition('=')
        source, dot, key = head.partition('.')
        if not sep or not dot or not source or not key:
            raise UsageError(f'--attention-opt expects SOURCE.KEY=VALUE (e.g. dino_resnet50.weights=/path.pth), '
                             f'got {pair!r}')
        by_source.setdefault(source, []).append(pair[len(source) + 1:])
    try:
        return {source: parse_source_opts(items) for source, items in by_source.items()}
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_from_args(args) -> int:
    """Run a command line parsed by ``scripts/prepare_data.py``; the exit status (0, 1, 2)."""
    try:
        if args.check:
            problems = []
            for option_file in args.check:
                problems += check_layout(option_file, args.root)
            for p in problems:
                print(f'problem: {p}')
            print(f'[check] {len(args.check)} option file(s): ' +
                  ('layout OK' if not problems else f'{len(problems)} problem(s)'))
            return 1 if problems else 0
        if args.command is None:
            raise UsageError('give a command (faces or df2k) or --check OPTION_FILE')
        if args.workers < 1 or args.commit_every < 1 or (args.limit is not None and args.limit < 1):
            raise UsageError('--workers, --commit-every and --limit must be >= 1')
        if not 0 <= args.compress_level <= 9:
            raise UsageError('--compress-level must be in 0..9')
        opts = _attention_opts(args.attention_opt)
        if args.command == 'faces':
            plan = face_jobs(args.input, args.output, args.scenarios, args.val, args.name, args.limit,
                             args.compress_level, args.attention, opts)
        else:
            plan = df2k_jobs(args.train_hr or [], args.val_hr or [], args.output, args.limit, args.compress_level,
                             args.attention, opts)
        return run_plan(plan, args.workers, args.commit_every, args.device, args.attention_batch,
                        not args.no_progress, force=args.force)
    except (UsageError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (DiskFullError, lmdb.Error, OSError) as err:
        full = disk_full_error(err, getattr(err, 'path', None) or getattr(args, 'output', None) or '.')
        if full is None:
            raise
        print(f'error: {full}', file=sys.stderr)  # one line, no traceback; what was committed stays (rerun)
        return DISK_FULL_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prepare the paper's datasets (BasicSR LMDBs) as the option files "
                                'expect them, or --check an existing layout.')
    p.add_argument('--check', nargs='+', metavar='OPTION_FILE',
                   help='verify the data these option files read (no command needed); exit 1 on a problem')
    p.add_argument('--root', default='.', help='--check: folder the option files\' relative paths start from')
    sub = p.add_subparsers(dest='command')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--output', default='datasets', help='datasets root (default: datasets)')
    common.add_argument('--attention', nargs='+', default=[], metavar='SOURCE[:HEADS]',
                        help='attention maps to precompute on the LR LMDBs, e.g. dino_resnet50:max edge sift')
    common.add_argument('--attention-opt', action='append', default=[], metavar='SOURCE.KEY=VALUE',
                        help='attention source option (repeatable), e.g. dino_resnet50.weights=/w/dino.pth')
    common.add_argument('--device', default=None, help='torch device of the DINO sources (default cuda if available)')
    common.add_argument('--attention-batch', type=int, default=8, help='images per attention batch (default 8)')
    common.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='processes decoding and resizing images (default min(4, CPUs))')
    common.add_argument('--limit', type=int, default=None, metavar='N', help='only the first N images (sorted by name)')
    common.add_argument('--compress-level', type=int, default=1, help='PNG compression 0..9 (default 1, as BasicSR)')
    common.add_argument('--commit-every', type=int, default=16, metavar='N',
                        help='input images per LMDB transaction (default 16)')
    common.add_argument('--force', action='store_true',
                        help='LMDBs made with other settings (another recipe, other input images, other attention '
                        'options) are archived (<folder>_archived_<time>) and made afresh, instead of refused')
    common.add_argument('--no-progress', action='store_true', help='no progress bars')
    faces = sub.add_parser('faces', parents=[common], help='FFHQ / CelebA-HQ: HR and LR of the face scenarios')
    faces.add_argument('--input', required=True, help='folder of face images (searched recursively)')
    faces.add_argument('--val', action='store_true', help='name the output CelebA-HQ (validation/test sets)')
    faces.add_argument('--name', default=None, help='output folder name under --output (default FFHQ / CelebA-HQ)')
    faces.add_argument('--scenarios', nargs='+', default=list(FACE_SCENARIOS),
                       choices=list(FACE_SCENARIOS), help='LR_HR sizes to make (default: all)')
    df2k = sub.add_parser('df2k', parents=[common], help='DF2K sub-images and DIV2K validation, x4')
    df2k.add_argument('--train-hr', nargs='+', metavar='DIR', help='HR folders of DF2K (DIV2K_train_HR, Flickr2K_HR)')
    df2k.add_argument('--val-hr', nargs='+', metavar='DIR', help='HR folder(s) of DIV2K validation (DIV2K_valid_HR)')
    return p


def main(argv=None) -> int:
    """Parse ``argv`` and run; the exit status: 0, 1 (an image or map failed, or --check found a problem), 2 (usage,
    full disk)."""
    args = build_parser().parse_args(argv)
    return run_from_args(args)


if __name__ == '__main__':
    sys.exit(main())
