"""The YODA core is plain PyTorch: ``import yoda_plugin.core`` (and ``yoda_plugin.config``) works with BasicSR, OpenCV
and LMDB absent."""
import ast
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(REPO, 'yoda_plugin', 'core')


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
            assert not any(n.split('.')[0] in ('basicsr', 'yoda_plugin', 'cv2', 'lmdb') for n in names), \
                f'{path}: {names}'


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s on a busy 2-core machine
def test_core_imports_and_samples_with_basicsr_cv2_lmdb_blocked():
    code = '''
import sys
for name in ('basicsr', 'cv2', 'lmdb'):
    sys.modules[name] = None  # any "import basicsr" (cv2, lmdb) now fails
import torch
import yoda_plugin.core as core
import yoda_plugin
assert yoda_plugin.BASICSR_IMPORT_ERROR is not None
s = core.DiffusionSchedule.from_options('linear', 50, linear_start=1e-4, linear_end=0.1)
x = torch.zeros(1, 3, 8, 8)
for name in ('ddpm', 'ddim', 'dpmpp_2m'):
    sampler = core.YODAConfig().wrap(core.SamplerConfig(type=name, steps=10).build(s), torch.rand(1, 1, 8, 8), x)
    out = core.sample(lambda z, k, m: torch.zeros_like(z), sampler, x)
    assert out.shape == x.shape
import yoda_plugin.config as config  # the option sections and the pipeline builder need no BasicSR either
sections = config.option_sections('srdiff', {'diffusion': {'sample_steps': 4}})
assert sections['diffusion'].schedule == 'cosine'
assert sections['backbone_opts'] == {'res_rescale': 2.0, 'clip_input': True}
loaded = [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] in ('basicsr', 'cv2', 'lmdb')]
assert not loaded, loaded
try:
    yoda_plugin.models
except ImportError as err:
    assert 'yoda_plugin.core works without them' in str(err)
else:
    raise AssertionError('yoda_plugin.models should say that BasicSR is missing')
print('ok')
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr
