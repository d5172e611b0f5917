#!/usr/bin/env python
"""Print a markdown table of test runs, comparable with the paper's tables.

    python scripts/summarize_results.py results/test_SR3_16_128_CelebA-HQ results/test_SR3_YODA_16_128_CelebA-HQ
    python scripts/summarize_results.py 'results/*/summary_*.json' --out table.md

Arguments are ``summary_<dataset>.json`` files (written by SR3Model in test
mode), folders holding them, or glob patterns. Columns: run (the result folder
name), dataset, images, PSNR, SSIM, LPIPS (blank when not configured), YODA's
share of pixel updates versus full diffusion and the sampling steps. Metrics
are matched by name case-insensitively (``psnr``, ``ssim``, ``lpips``); other
metrics of the summaries get their own columns.
"""
import argparse
import glob
import json
import os
import sys

MAIN = ('psnr', 'ssim', 'lpips')
DIGITS = {'psnr': 2, 'ssim': 3, 'lpips': 3}


def find_summaries(specs):
    files = []
    for spec in specs:
        if os.path.isdir(spec):
            matches = sorted(glob.glob(os.path.join(spec, 'summary_*.json')))
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            matches = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f'no summary_*.json at {spec!r}')
        files += [m for m in matches if m not in files]
    return files


def load_rows(files):
    rows = []
    for path in files:
        with open(path, encoding='utf-8') as f:
            s = json.load(f)
        metrics = {str(k).lower(): v for k, v in (s.get('metrics') or {}).items()}
        yoda = s.get('yoda') or {}
        rows.append({'run': os.path.basename(os.path.dirname(os.path.abspath(path))), 'dataset': s.get('dataset', '?'),
                     'images': s.get('images'), 'metrics': metrics, 'update_ratio': s.get('update_ratio'),
                     'steps': s.get('sample_steps'), 'yoda': bool(yoda.get('enabled'))})
    return rows


def _fmt(value, digits):
    return '' if value is None else f'{value:.{digits}f}'


def markdown_table(rows) -> str:
    extra = sorted({k for r in rows for k in r['metrics']} - set(MAIN))
    head = ['run', 'dataset', 'images', 'PSNR ↑', 'SSIM ↑', 'LPIPS ↓'] + extra
    head += ['YODA', 'pixel updates', 'steps']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * 3 + ['---:'] * (3 + len(extra)) +
                                                           ['---', '---:', '---:']) + '|']
    for r in rows:
        m = r['metrics']
        cells = [r['run'], r['dataset'], str(r['images'] if r['images'] is not None else '')]
        cells += [_fmt(m.get(k), DIGITS[k]) for k in MAIN] + [_fmt(m.get(k), 4) for k in extra]
        ratio = r['update_ratio']
        cells += ['yes' if r['yoda'] else 'no', '' if ratio is None else f'{100 * ratio:.1f}%',
                  str(r['steps'] if r['steps'] is not None else '')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('summaries', nargs='+', help='summary JSON files, result folders or glob patterns')
    p.add_argument('--out', help='also write the table to this file')
    args = p.parse_args(argv)
    try:
        files = find_summaries(args.summaries)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    table = markdown_table(load_rows(files))
    print(table)
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
            f.write(table + '\n')
        print(f'wrote {args.out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
