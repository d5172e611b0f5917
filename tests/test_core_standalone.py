"""The YODA core is plain PyTorch: it imports and runs with BasicSR unavailable (plug and play)."""
import ast
import glob
import os
import subprocess
import sys

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'yoda_plugin', 'core')


def test_core_sources_import_no_basicsr():
    for path in glob.glob(os.path.join(CORE, '*.py')):
        tree = ast.parse(open(path, encoding='utf-8').read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or '']
            else:
                continue
            assert not any(n.split('.')[0] in ('basicsr', 'yoda_plugin') for n in names), f'{path}: {names}'


def test_core_runs_with_basicsr_blocked():
    code = f'''
import importlib.util, sys
sys.modules['basicsr'] = None  # any "import basicsr" now fails
spec = importlib.util.spec_from_file_location('yoda_core', {os.path.join(CORE, "__init__.py")!r},
                                              submodule_search_locations=[{CORE!r}])
core = importlib.util.module_from_spec(spec); sys.modules['yoda_core'] = core; spec.loader.exec_module(core)
import torch
s = core.DiffusionSchedule.from_options('linear', 50, linear_start=1e-4, linear_end=0.1).respace(10)
x = torch.zeros(1, 3, 8, 8)
out = core.sample_loop(lambda z, k: torch.zeros_like(z), s, x, torch.rand(1, 1, 8, 8), core.YODAConfig())
assert out.shape == x.shape and 'basicsr' not in [m for m in sys.modules if sys.modules[m] is not None]
print('ok')
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr
