#!/usr/bin/env python
"""Measure the package's import graph: cycles, imports that run against the layers, lines per layer.

    python scripts/import_graph.py [--package yoda_plugin] [--json]

Every import counts, function-level ones included (grimp, the library under
import-linter, reads them all). The layers are read from the import-linter
contract in ``.importlinter`` (``--layers-from``), top first; a module belongs
to the first layer with a module that is it or contains it. An import from a
lower layer to a higher one is "wrong-way" (whether or not the contract
ignores it); a cycle is a strongly connected group of modules (two or more)
of the direct-import graph. A package whose ``__init__`` imports its own
submodules to register them, which import names back from it, is listed
apart ("registration" cycles: the BasicSR pattern). The package root
(``yoda_plugin/__init__``, which registers everything with BasicSR) belongs to
no layer.
"""
import configparser
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = []  # [(name, (module, ...))], top first: filled from the contract


def read_layers(path: str) -> list:
    """The layers of the first ``type = layers`` contract of an import-linter INI file."""
    config = configparser.ConfigParser()
    config.read(path)
    for section in config.sections():
        if config[section].get('type') == 'layers':
            layers = []
            for line in config[section]['layers'].strip().splitlines():
                modules = tuple(m.strip().strip('()') for m in line.replace('|', ':').split(':') if m.strip())
                layers.append((modules[0].split('.')[-1] + (' ...' if len(modules) > 1 else ''), modules))
            return layers
    raise SystemExit(f'{path}: no layers contract')


def layer_of(module: str):
    for index, (name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + '.') for p in prefixes):
            return index, name
    return None, None


def strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm, iterative; groups of two or more modules."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def registration_cycle(group) -> bool:
    """A package and its own submodules only (its ``__init__`` imports them to register them)."""
    root = min(group, key=len)
    return all(m == root or m.startswith(root + '.') for m in group)


def module_lines(package: str) -> dict:
    """Module -> number of lines of its file."""
    import importlib.util
    spec_root = os.path.dirname(importlib.util.find_spec(package).origin)
    out = {}
    for folder, _, files in os.walk(spec_root):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(spec_root))[:-3].replace(os.sep, '.')
            module = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
            with open(path, encoding='utf-8') as f:
                out[module] = sum(1 for _ in f)
    return out


def measure(package: str = 'yoda_plugin') -> dict:
    import grimp
    graph = grimp.build_graph(package)
    direct = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = strongly_connected(direct)
    wrong = []
    for importer, imported_set in sorted(direct.items()):
        low, _ = layer_of(importer)
        for imported in sorted(imported_set):
            high, _ = layer_of(imported)
            if low is not None and high is not None and high < low:
                lines = [d['line_number'] for d in graph.get_import_details(importer=importer, imported=imported)]
                wrong.append({'importer': importer, 'imported': imported, 'lines': lines,
                              'from': LAYERS[low][0], 'to': LAYERS[high][0]})
    lines = module_lines(package)
    per_layer = {}
    for module, count in lines.items():
        _, name = layer_of(module)
        per_layer[name or '(package root)'] = per_layer.get(name or '(package root)', 0) + count
    return {'modules': len(direct), 'imports': sum(len(v) for v in direct.values()),
            'cycles': [g for g in cycles if not registration_cycle(g)],
            'registration_cycles': [g for g in cycles if registration_cycle(g)], 'wrong_way': wrong,
            'lines_per_layer': {name: per_layer.get(name, 0) for name, _ in LAYERS} |
            {k: v for k, v in per_layer.items() if k == '(package root)'}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--package', default='yoda_plugin')
    p.add_argument('--layers-from', default=os.path.join(REPO, '.importlinter'), help='import-linter INI file')
    p.add_argument('--root', default=REPO, help='folder holding the package (e.g. an older tree, for a comparison)')
    p.add_argument('--json', action='store_true', help='print the measurement as JSON')
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    LAYERS[:] = read_layers(args.layers_from)
    result = measure(args.package)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f'{result["modules"]} modules, {result["imports"]} direct imports')
    print(f'cycles: {len(result["cycles"])}')
    for group in result['cycles']:
        print('  ' + ' <-> '.join(group))
    print(f'registration cycles (a package and its own submodules): {len(result["registration_cycles"])}')
    for group in result['registration_cycles']:
        print('  ' + ' <-> '.join(group))
    print(f'wrong-way imports (lower layer -> higher layer): {len(result["wrong_way"])}')
    for w in result['wrong_way']:
        print(f'  {w["importer"]} ({w["from"]}) -> {w["imported"]} ({w["to"]}), line {w["lines"]}')
    print('lines per layer (layers named by their first module):')
    for name, count in result['lines_per_layer'].items():
        print(f'  {name}: {count}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
