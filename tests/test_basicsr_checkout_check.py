"""scripts/check_basicsr_checkout.sh sets itself up and leaves the BasicSR checkout untouched.

CI has no BasicSR source checkout and no internet: a fake one is built from the installed basicsr package
(its files without version.py, a VERSION file, a minimal setup.py, a git repository when git is there), as a
source checkout looks before ``pip install -e``.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_env

SCRIPT = os.path.join(REPO, 'scripts', 'check_basicsr_checkout.sh')


def _helper():
    spec = importlib.util.spec_from_file_location('check_basicsr_checkout',
                                                  os.path.join(REPO, 'scripts', 'check_basicsr_checkout.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkout(path, git=True):
    """A BasicSR source checkout made of the installed package: no basicsr/version.py, so it cannot run bare."""
    import basicsr
    shutil.copytree(os.path.dirname(basicsr.__file__), path / 'basicsr',
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc', 'version.py'))
    # PyPI's 1.4.2 predates BasicSR's fix for current torchvision (upstream commit 8d56e3a, #650), which a
    # checkout of current main has: the same one-line change here.
    deg = path / 'basicsr' / 'data' / 'degradations.py'
    deg.write_text(deg.read_text().replace('torchvision.transforms.functional_tensor',
                                           'torchvision.transforms.functional'))
    (path / 'VERSION').write_text(basicsr.__version__.split('+')[0] + '\n')
    (path / 'setup.py').write_text("from setuptools import find_packages, setup\n"
                                   "setup(name='basicsr', version=open('VERSION').read().strip(),\n"
                                   "      packages=find_packages())\n")
    (path / '.gitignore').write_text('version.py\nexperiments/*\nresults/*\ntb_logger/*\ndatasets/*\n')
    if git and shutil.which('git'):
        env = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t',
                   GIT_COMMITTER_EMAIL='t@t')
        for cmd in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'fake BasicSR checkout']):
            subprocess.run(['git', '-C', str(path)] + cmd, check=True, env=env, capture_output=True)
    return path


def snapshot(path):
    """Every name under ``path`` (folders too, .git included) and the sha256 of every file."""
    names, hashes = [], {}
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in dirs + sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), path)
            names.append(rel)
            if name in files:
                with open(os.path.join(folder, name), 'rb') as f:
                    hashes[rel] = hashlib.sha256(f.read()).hexdigest()
    return sorted(names), hashes


@pytest.mark.slow
def test_checkout_check_runs_the_checkout_and_leaves_it_unchanged(tmp_path):
    pytest.importorskip('skimage')  # the demo data come from scikit-image's photos (the [test] extra)
    checkout = fake_checkout(tmp_path / 'BasicSR')
    work = tmp_path / 'work'
    work.mkdir()
    before = snapshot(checkout)
    env = dict(run_env(), YODA_PYTHON=sys.executable, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run(['bash', SCRIPT, str(checkout), '--workdir', str(work)], env=env, capture_output=True,
                          text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert snapshot(checkout) == before, 'the check changed files of the checkout'
    for name in ('experiments', 'results', 'tb_logger', 'datasets'):
        assert not (checkout / name).exists(), name
    assert os.listdir(work) == [], 'the temporary work folder was not removed'
    # import basicsr resolved to the copy in the work folder, with the version.py setup.py would write
    assert f'from {os.path.realpath(work)}' in out and '/BasicSR/basicsr/__init__.py' in out
    assert 'No module named' not in out and 'Found no NVIDIA driver' not in out
    assert 'Resuming training from epoch: 0, iter: 3.' in out
    for stage in ('setup', 'data', 'train', 'resume', 'test'):
        assert f'[check] stage {stage} done in ' in out
    assert '[check] test metrics (from its log): psnr ' in out and 'lr_psnr ' in out
    assert '[check] stage times:' in out and '  total ' in out
    assert '[check] checkout unchanged: ' in out
    assert out.rstrip().endswith('tested the demo options with its own runners')


@pytest.mark.slow
def test_copy_of_a_plain_folder_and_version_py(tmp_path):
    helper = _helper()
    checkout = fake_checkout(tmp_path / 'BasicSR', git=False)
    (checkout / 'basicsr' / 'version.py').write_text("__version__ = 'stale'\n")
    (checkout / 'basicsr' / '__pycache__').mkdir()
    (checkout / 'basicsr' / '__pycache__' / 'x.cpython-311.pyc').write_bytes(b'')
    (checkout / 'datasets').mkdir()
    (checkout / 'datasets' / 'big.lmdb').write_bytes(b'not copied')
    before = snapshot(checkout)
    copy = tmp_path / 'copy'
    count = helper.copy_checkout(str(checkout), str(copy))
    assert helper.git_sha(str(checkout)) == 'unknown'
    version = helper.write_version_py(str(copy), 'unknown')
    assert snapshot(checkout) == before
    assert sorted(os.listdir(copy)) == ['VERSION', 'basicsr']
    assert count == len(snapshot(copy)[1]) - 1  # every copied file, plus the version.py written
    assert not list(copy.rglob('__pycache__'))
    text = (copy / 'basicsr' / 'version.py').read_text()
    ns = {}
    exec(text, ns)
    assert ns['__version__'] == version == (checkout / 'VERSION').read_text().strip()
    assert ns['__gitsha__'] == 'unknown' and ns['version_info'][0] == int(version.split('.')[0])


@pytest.mark.slow
def test_not_a_checkout_is_refused(tmp_path):
    env = dict(run_env(), YODA_PYTHON=sys.executable)
    proc = subprocess.run(['bash', SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and 'basicsr/train.py' in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []
