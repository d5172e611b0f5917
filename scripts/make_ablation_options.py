#!/usr/bin/env python
"""Write the option files of the paper's Table 1 ablation (SR3 + YODA, 16x16 -> 128x128).

    python scripts/make_ablation_options.py            # (re)write options/ablation/*.yml
    python scripts/make_ablation_options.py --check    # exit 1 if a committed file is missing or stale
    python scripts/make_ablation_options.py --list     # variants, attention LMDBs and precompute commands

Every variant is derived *textually* from ``options/train_sr3_yoda.yml`` and
``options/test_sr3_yoda.yml`` (the ResNet-50 MAX row, the paper's choice), so
all hyper-parameters, comments included, stay those of the template. Only
these lines change:

* ``name`` (suffix ``_abl_<variant>``),
* every ``dataroot_attention`` (``attention_<variant>_16.lmdb`` next to the
  template's LMDB),
* every ``attention_meta`` (the source and head the LMDB must have been made with),
* in the test file, ``path.pretrain_network_g``, which names the training run.

After writing, each file is parsed with the safe option loader and compared
with its template key by key; any other difference is an error. A generator
was preferred to ``--force_yml`` overrides because (a) BasicSR's ``--force_yml``
cannot add keys and works on values only, so 19 long command lines would have
to be kept in sync by hand, (b) committed files are runnable by BasicSR's own
``basicsr/train.py`` too, and (c) ``--check`` (run by the tests) keeps them in
sync with the template.
"""
import argparse
import os
import re
import sys
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TEMPLATES = {'train': 'options/train_sr3_yoda.yml', 'test': 'options/test_sr3_yoda.yml'}
OUT_DIR = 'options/ablation'
TEMPLATE_LMDB_TAG = 'dino_resnet50_max'

# Paper Table 1 (CelebA-HQ, 16 -> 128): PSNR, SSIM, LPIPS of each row, for comparison in the header.
PAPER = {
    'gaussian': ('Gaussian', 22.13, 0.602, 0.260),
    'edge': ('Edge-based Seg.', 22.93, 0.648, 0.151),
    'sift': ('SIFT', 22.84, 0.678, 0.095),
    'vits8_head0': ('ViT-S/8 Att.-Head 0', 22.91, 0.650, 0.105),
    'vits8_head1': ('ViT-S/8 Att.-Head 1', 22.43, 0.616, 0.130),
    'vits8_head2': ('ViT-S/8 Att.-Head 2', 22.55, 0.633, 0.111),
    'vits8_head3': ('ViT-S/8 Att.-Head 3', 22.73, 0.641, 0.110),
    'vits8_head4': ('ViT-S/8 Att.-Head 4', 22.85, 0.645, 0.097),
    'vits8_head5': ('ViT-S/8 Att.-Head 5', 22.86, 0.648, 0.101),
    'vits8_avg': ('ViT-S/8 AVG', 23.25, 0.663, 0.122),
    'vits8_max': ('ViT-S/8 MAX', 23.46, 0.683, 0.103),
    'resnet50_head0': ('ResNet-50 Att.-Head 0', 22.82, 0.649, 0.115),
    'resnet50_head1': ('ResNet-50 Att.-Head 1', 22.54, 0.627, 0.117),
    'resnet50_head2': ('ResNet-50 Att.-Head 2', 22.84, 0.650, 0.107),
    'resnet50_head3': ('ResNet-50 Att.-Head 3', 22.78, 0.645, 0.105),
    'resnet50_head4': ('ResNet-50 Att.-Head 4', 22.38, 0.620, 0.127),
    'resnet50_head5': ('ResNet-50 Att.-Head 5', 22.50, 0.630, 0.119),
    'resnet50_avg': ('ResNet-50 AVG', 23.55, 0.682, 0.093),
    'resnet50_max': ('ResNet-50 MAX', 23.84, 0.695, 0.072),
}


def variants() -> List[Tuple[str, str, dict]]:
    """(variant, LMDB tag, source config for attention_meta) for every Table 1 row with attention."""
    out = [('gaussian', 'gaussian', {'name': 'gaussian'}), ('edge', 'edge', {'name': 'edge'}),
           ('sift', 'sift', {'name': 'sift'})]
    for backbone, source in (('vits8', 'dino_vits8'), ('resnet50', 'dino_resnet50')):
        for heads in [0, 1, 2, 3, 4, 5, 'avg', 'max']:
            tag = f'head{heads}' if isinstance(heads, int) else heads
            out.append((f'{backbone}_{tag}', f'{source}_{tag}', {'name': source, 'heads': heads}))
    return out


def _flow(source: dict) -> str:
    return '{source: {' + ', '.join(f'{k}: {v}' for k, v in source.items()) + '}}'


def _source_args(source: dict) -> str:
    args = f'--source {source["name"]}'
    if 'heads' in source:
        args += f' --source-opt heads={source["heads"]}'
    return args


def _sub(text: str, pattern: str, repl, expected: int, what: str, template: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if n != expected:
        raise RuntimeError(f'{template}: expected {expected} "{what}" line(s) to rewrite, found {n}; '
                           'update scripts/make_ablation_options.py to the template')
    return new


def derive(kind: str, template_text: str, variant: str, lmdb_tag: str, source: dict, template: str) -> str:
    """The option file text of ``variant`` from a template's text."""
    head, sep, body = template_text.partition('yoda_plugin: !!python/name:')
    if not sep:
        raise RuntimeError(f'{template} lacks the "yoda_plugin: !!python/name:..." line')
    n_sets = len(re.findall(r'^\s+dataroot_attention:', body, flags=re.M))
    body = _sub(body, r'^name: (\S+)$', lambda m: f'name: {m.group(1)}_abl_{variant}', 1, 'name', template)
    body = _sub(body, rf'^(\s+dataroot_attention: \S*/attention_){TEMPLATE_LMDB_TAG}(_\d+\.lmdb)\s*$',
                lambda m: f'{m.group(1)}{lmdb_tag}{m.group(2)}', n_sets, 'dataroot_attention', template)
    body = _sub(body, r'^(\s+attention_meta: ).*$', lambda m: m.group(1) + _flow(source), n_sets, 'attention_meta',
                template)
    if kind == 'test':  # the test loads the variant's own training run
        body = _sub(body, r'^(\s+pretrain_network_g: experiments/[^/\s]+)(/\S*)$',
                    lambda m: f'{m.group(1)}_abl_{variant}{m.group(2)}', 1, 'pretrain_network_g', template)
    row, psnr, ssim, lp = PAPER[variant]
    lmdbs = re.findall(r'^\s+dataroot_attention: (\S+)', body, flags=re.M)
    lines = [
        f'# GENERATED by scripts/make_ablation_options.py from {template}: do not edit, edit the template and re-run.',
        f'# Paper Table 1, row "{row}" (SR3 + YODA, 16x16 -> 128x128, CelebA-HQ): '
        f'PSNR {psnr:.2f}, SSIM {ssim:.3f}, LPIPS {lp:.3f}.',
        '# Everything but the attention maps is the template\'s (paper: AdamW lr 5e-5, weight decay 1e-4, EMA,',
        '# T_train 500, T_eval 200, 1M iterations, UNet base 64, mults [1, 2, 4, 8, 8], 3 ResBlocks, GroupNorm 32).',
        '# Attention maps of the LR images, once per split:',
    ]
    for lmdb in lmdbs:
        lr_lmdb = re.sub(r'attention_[^/]*_(\d+)\.lmdb$', r'lr_\1.lmdb', lmdb)
        lines.append(f'#   python scripts/precompute_attention.py --input {lr_lmdb} --output {lmdb} '
                     f'{_source_args(source)}')
    return '\n'.join(lines) + '\n' + sep + body


def _flatten(d, prefix=''):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f'{prefix}{k}.'))
    else:
        out[prefix[:-1]] = d
    return out


def check_derived(kind: str, template_path: str, derived_path: str, variant: str, lmdb_tag: str,
                  source: dict) -> None:
    """Parse both files and make sure only the intended keys differ, with the intended values."""
    from yoda_plugin.utils.options import load_options
    a, b = _flatten(load_options(template_path)), _flatten(load_options(derived_path))
    if set(a) - {k for k in a if k.endswith('attention_meta.source.heads')} != \
            set(b) - {k for k in b if k.endswith('attention_meta.source.heads')}:
        raise RuntimeError(f'{derived_path}: keys differ from {template_path}: {sorted(set(a) ^ set(b))}')
    allowed = re.compile(r'^(name|datasets\.[^.]+\.dataroot_attention|datasets\.[^.]+\.attention_meta\..*|'
                         r'path\.pretrain_network_g)$')
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    bad = [k for k in changed if not allowed.match(k)]
    if bad:
        raise RuntimeError(f'{derived_path}: unintended differences from {template_path}: {bad}')
    if b['name'] != f'{a["name"]}_abl_{variant}':
        raise RuntimeError(f'{derived_path}: unexpected name {b["name"]!r}')
    for k, v in b.items():
        if k.endswith('.dataroot_attention') and f'/attention_{lmdb_tag}_' not in v:
            raise RuntimeError(f'{derived_path}: {k} = {v!r} does not name the {lmdb_tag} maps')
        if '.attention_meta.source.' in k and v != source[k.rsplit('.', 1)[1]]:
            raise RuntimeError(f'{derived_path}: {k} = {v!r}, expected {source[k.rsplit(".", 1)[1]]!r}')


def build_all(repo: str = REPO) -> Dict[str, str]:
    """{relative output path: text} for every variant and kind."""
    files = {}
    for kind, template in TEMPLATES.items():
        with open(os.path.join(repo, template), encoding='utf-8') as f:
            text = f.read()
        for variant, lmdb_tag, source in variants():
            files[f'{OUT_DIR}/{kind}_sr3_yoda_abl_{variant}.yml'] = derive(kind, text, variant, lmdb_tag, source,
                                                                           template)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--check', action='store_true', help='only verify that the committed files are up to date')
    p.add_argument('--list', action='store_true', help='print the variants and their attention LMDBs')
    p.add_argument('--repo', default=REPO, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    files = build_all(args.repo)
    if args.list:
        for variant, lmdb_tag, source in variants():
            print(f'{variant:16s} {PAPER[variant][0]:24s} attention_{lmdb_tag}_16.lmdb  {_source_args(source)}')
        return 0
    if args.check:
        stale = []
        for rel, text in files.items():
            path = os.path.join(args.repo, rel)
            if not os.path.isfile(path) or open(path, encoding='utf-8').read() != text:
                stale.append(rel)
        known = set(os.path.basename(r) for r in files)
        out_dir = os.path.join(args.repo, OUT_DIR)
        extra = sorted(f for f in os.listdir(out_dir) if f.endswith('.yml') and f not in known) \
            if os.path.isdir(out_dir) else []
        if stale or extra:
            for rel in stale:
                print(f'stale or missing: {rel}', file=sys.stderr)
            for f in extra:
                print(f'not generated by this script: {OUT_DIR}/{f}', file=sys.stderr)
            print('run: python scripts/make_ablation_options.py', file=sys.stderr)
            return 1
        print(f'{len(files)} ablation option files are up to date')
        return 0
    os.makedirs(os.path.join(args.repo, OUT_DIR), exist_ok=True)
    for rel, text in files.items():
        path = os.path.join(args.repo, rel)
        tmp = f'{path}.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    by_variant = {v: (t, s) for v, t, s in variants()}
    for rel in files:
        kind = os.path.basename(rel).split('_', 1)[0]
        variant = os.path.basename(rel)[:-4].split('_abl_', 1)[1]
        check_derived(kind, os.path.join(args.repo, TEMPLATES[kind]), os.path.join(args.repo, rel), variant,
                      *by_variant[variant])
        print(f'wrote {rel}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
