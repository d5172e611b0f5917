"""The package's layers (``.importlinter``): applications > runner > inference > library > data > config > core >
utils. ``lint-imports`` checks every import, function-level ones included; a wrong-way import fails here."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
pytestmark = pytest.mark.skipif(not os.path.exists(LINT), reason='import-linter is not installed (pip install .[test])')


def lint(cwd, pythonpath):
    env = {**os.environ, 'PYTHONPATH': pythonpath}
    return subprocess.run([LINT, '--no-cache'], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    proc = lint(REPO, REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert 'Contracts: 2 kept, 0 broken' in proc.stdout


@pytest.mark.parametrize('module, line', [
    ('core/schedule.py', 'from yoda_plugin.config import DiffusionConfig'),  # the core reaching up
    ('inference.py', 'from yoda_plugin.models.base_model import DiffusionSRModel'),  # inference needing training
    ('config.py', 'import basicsr'),  # the option sections must stay BasicSR-free
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path, module, line):
    shutil.copytree(os.path.join(REPO, 'yoda_plugin'), tmp_path / 'yoda_plugin',
                    ignore=shutil.ignore_patterns('__pycache__', '*.pth', '*.pyc'))
    shutil.copy(os.path.join(REPO, '.importlinter'), tmp_path)
    path = tmp_path / 'yoda_plugin' / module
    path.write_text(path.read_text() + f'\n\ndef _wrong_way():\n    {line}\n')  # function-level imports count
    proc = lint(tmp_path, str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert 'BROKEN' in proc.stdout and f'yoda_plugin.{module[:-3].replace("/", ".")}' in proc.stdout
