"""scripts/benchmark_thread_wait.py runs every setting and finds the outputs identical (timings are not tested)."""
import subprocess
import sys

import pytest

from conftest import REPO, run_env


@pytest.mark.slow
def test_thread_wait_benchmark_prints_its_table(tmp_path):
    proc = subprocess.run([sys.executable, 'scripts/benchmark_thread_wait.py', '--size', '16', '--steps', '2',
                           '--repeats', '1', '--tmp', str(tmp_path)], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith('| quiet') or line.startswith('| one')]
    assert len(rows) == 6 and all(row.rstrip().endswith('| yes |') for row in rows), proc.stdout
    assert 'run 1/1' in proc.stderr  # progress per run
