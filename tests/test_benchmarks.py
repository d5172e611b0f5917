"""The performance benchmark scripts run and print their tables (numbers are machine-dependent: not checked)."""
import os
import re
import subprocess

import pytest

from conftest import PYTHON, REPO, load_script, run, run_env, tiny_options, write_options


def run_merged(args, cwd, timeout=120):
    """A subprocess with stderr merged into stdout: shows in which order progress lines and table rows came."""
    proc = subprocess.run(args, cwd=cwd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout.splitlines()


def stage_lines(err, prefix):
    """{stage: [its progress lines]} from stderr lines '[prefix] stage: text'."""
    stages = {}
    for line in err.splitlines():
        m = re.match(rf'\[{re.escape(prefix)}\] (.+?): (.+)$', line)
        if m:
            stages.setdefault(m.group(1), []).append(m.group(2))
    return stages


def assert_stages(err, prefix, expected):
    """Every expected stage printed its start line ('N units'), per-unit 'i/N' lines with an estimate of the time
    left (all but the last), and a 'done' line."""
    stages = stage_lines(err, prefix)
    for what in expected:
        lines = next((v for k, v in stages.items() if k.startswith(what)), None)
        assert lines, f'no progress lines for stage {what!r} in:\n{err}'
        total = int(lines[0].split()[0])
        assert total > 0 and lines[-1].startswith('done, '), lines
        steps = [line for line in lines[1:-1] if re.match(rf'\d+/{total} ', line)]
        assert len(steps) >= 1 and steps[-1].startswith(f'{total}/{total} '), lines
        assert all(re.search(r', ~[\d.]+ (s|min)', line) for line in steps[1:-1]), lines  # time left
    return stages


def test_progress_helper_estimates_the_time_left(capsys):
    from yoda_plugin.utils.progress import Progress, format_seconds
    assert [format_seconds(s) for s in (3.21, 42, 185, 3725)] == ['3.2 s', '42 s', '3 min 05 s', '1 h 02 min']
    p = Progress('stage', 3, unit='passes', prefix='bench', weights=[1, 1, 2])
    assert p.left() is None
    p.start -= 10  # 10 s for the first unit (weight 1): 3 weight units left
    p.update(detail='first')
    assert 29 < p.left() < 31
    p.update()
    p.update()
    p.done()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == '[bench] stage: 3 passes'
    assert re.match(r'\[bench\] stage: 1/3 passes, 10 s elapsed, ~30 s left \(first\)$', err[1]), err
    assert err[3].startswith('[bench] stage: 3/3 passes, ') and 'left' not in err[3]
    assert err[4].startswith('[bench] stage: done, 3 passes in ')


def table_rows(out, header_start):
    """Rows (lists of cells) of the Markdown table whose header starts with ``header_start``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip().strip('|').split('|')])
    return rows


@pytest.mark.slow
def test_overhead_benchmark_prints_sparse_variants(tmp_path):
    proc = run([PYTHON, os.path.join(REPO, 'scripts', 'benchmark_yoda_overhead.py'), '--net', 'small', '--size', '32',
                '--batch', '1', '--repeats', '2', '--sample-steps', '6', '--sparse', 'bbox:4', 'regions:0',
                '--region-cost', '0', '--device', 'cpu'], cwd=tmp_path)
    rows = table_rows(proc.stdout, '| measurement |')
    # Rows in the order their stages run (each printed when measured).
    assert [r[0] for r in rows][:4] == ['training step, s (median of 2)',
                                        'gradient checkpointing training step / plain (median of 1)',
                                        'network forward, batch 1, s', 'dense sampling, 6 steps, s (median of 3)']
    assert any(r[0].startswith('gradient checkpointing training step / plain') and float(r[3]) > 0 for r in rows)
    sparse = {r[0]: r for r in table_rows(proc.stdout, '| variant (mode:margin) |')}
    assert set(sparse) == {'bbox:4', 'regions:0'}
    for r in sparse.values():
        assert 0 < float(r[3]) <= 1  # share of the dense network pixels
    assert float(sparse['regions:0'][3]) <= float(sparse['bbox:4'][3])  # no context margin: never more pixels
    # Progress on stderr: the plan (network passes per stage), then every stage with how far and the time left.
    assert proc.stderr.startswith('[overhead] plan (small UNet'), proc.stderr
    assert_stages(proc.stderr, 'overhead', ['training step', 'gradient checkpointing', 'network forward',
                                            'sampling, 4 variants x 3 rounds', 'fast paths, 4 variants'])


@pytest.mark.slow
def test_overhead_benchmark_quick_prints_rows_as_measured(tmp_path):
    lines = run_merged([PYTHON, os.path.join(REPO, 'scripts', 'benchmark_yoda_overhead.py'), '--net', 'small',
                        '--size', '32', '--batch', '1', '--repeats', '1', '--sample-steps', '2', '--sparse',
                        'regions:0', '--device', 'cpu', '--quick'], cwd=tmp_path)

    def index(start):
        return next(i for i, line in enumerate(lines) if line.startswith(start))

    # Each row right after its stage, before the next stage starts (stdout and stderr merged in order).
    assert index('[overhead] training step') < index('| training step') < index('[overhead] network forward')
    assert index('| network forward') < index('[overhead] sampling')
    assert index('[overhead] sampling, 3 variants x 3 rounds (interleaved): done') < index('| dense sampling')
    assert index('| regions:0 |') > index('| dense sampling')
    text = '\n'.join(lines)  # --quick: no gradient checkpointing, no fast paths
    assert '| gradient checkpointing' not in text and 'Fast paths' not in text and '[overhead] fast' not in text
    assert lines[0].endswith('--quick: no gradient checkpointing or fast-path stages')


@pytest.mark.slow
def test_memory_benchmark_measures_and_stops_at_the_limit(tiny_data, tmp_path):
    opt = tiny_options(tiny_data, name='membench')
    opt['datasets']['train']['batch_size_per_gpu'] = 4
    path = write_options(tmp_path / 'opt.yml', opt)
    script = os.path.join(REPO, 'scripts', 'benchmark_memory.py')
    proc = run([PYTHON, script, '--options', path, '--device', 'cpu'], cwd=tmp_path)
    rows = table_rows(proc.stdout, '| scenario |')
    assert [(r[0], r[3]) for r in rows] == [('membench', 'off'), ('membench', 'on')]
    assert proc.stderr.startswith('[memory] plan: 1 scenarios') and 'membench: batches [1, 2, 4]' in proc.stderr
    assert_stages(proc.stderr, 'memory', ['membench (32 px), gradient checkpointing off',
                                          'membench (32 px), gradient checkpointing on'])
    for r in rows:
        assert float(r[4]) > 0 and float(r[6]) >= float(r[4])  # batch 4 measured, at least batch 1's memory
    # A limit below what batches 1 and 2 use: batch 4 is not run; the table extrapolates and says so.
    proc = run([PYTHON, script, '--options', path, '--device', 'cpu', '--limit-gb', '1e-9'], cwd=tmp_path)
    rows = table_rows(proc.stdout, '| scenario |')
    assert all('extrapolated; largest run: 2' in r[6] and 'not run' in r[8] for r in rows), rows


@pytest.mark.slow
def test_sparse_quality_benchmark_on_a_checkpoint(tiny_data, tmp_path):
    import torch

    from yoda_plugin.archs.sr3_unet_arch import SR3UNet
    opt = tiny_options(tiny_data, name='sparse_quality')
    torch.manual_seed(0)
    net = SR3UNet(**{k: v for k, v in opt['network_g'].items() if k != 'type'})
    torch.save({'params_ema': net.state_dict()}, tmp_path / 'net.pth')
    opt['path'] = {'pretrain_network_g': str(tmp_path / 'net.pth')}
    path = write_options(tmp_path / 'test.yml', opt)
    script = os.path.join(REPO, 'scripts', 'benchmark_sparse_quality.py')
    proc = run([PYTHON, script, '--opt', path, '--variants', 'regions:64', 'regions:0'], cwd=tmp_path)
    rows = {r[0]: r for r in table_rows(proc.stdout, '| variant |')}
    assert list(rows) == ['dense', 'regions:64', 'regions:0']
    # columns: psnr, ssim, PSNR vs dense, pixels evaluated, s/image, time / dense
    assert rows['dense'][3] == 'inf (reference)' and rows['regions:64'][3] == 'inf'  # context = whole image: exact
    assert rows['regions:64'][1:3] == rows['dense'][1:3]
    assert rows['regions:0'][3] != 'inf' and float(rows['regions:0'][4]) < 1  # cropped: fewer pixels, not exact
    assert_stages(proc.stderr, 'sparse-quality', ['3 variants x'])
    bad = run([PYTHON, script, '--opt', path, '--variants', 'tiles:4'], cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "sparse variant 'tiles:4': expected MODE:MARGIN" in bad.stderr


@pytest.mark.slow
def test_coverage_table_from_masks_alone(tmp_path):
    proc = run([PYTHON, os.path.join(REPO, 'scripts', 'benchmark_yoda_overhead.py'), '--net', 'small', '--coverage',
                '32', '64', '--sample-steps', '20', '--sparse', 'bbox:8', 'regions:0'], cwd=tmp_path)
    rows = table_rows(proc.stdout, '| HR size |')
    assert [r[0] for r in rows] == ['32', '64']
    assert_stages(proc.stderr, 'overhead', ['coverage, 2 sizes x 2 variants + 2 bounds'])
    for size, share, bbox, regions, bound0, bound8 in rows:
        share, bbox, regions = float(share), float(bbox.split()[0]), float(regions.split()[0])
        bound0, bound8 = float(bound0.split()[0]), float(bound8.split()[0])
        assert 0 < share < 1 and share <= regions <= bbox <= 1  # no variant evaluates fewer pixels than YODA updates
        # The context bounds: at least the share, grow with the margin, and crops with that margin cost more.
        assert share <= bound0 <= regions and bound0 <= bound8 <= bbox


@pytest.mark.slow
def test_block_sparse_convolution_is_exact_and_timed(tmp_path):
    import torch
    import torch.nn.functional as F
    bench = load_script('benchmark_block_sparse_conv.py')
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 12, 16, generator=g), torch.randn(5, 3, 3, 3, generator=g)
    blocks = torch.tensor([[0, 1], [2, 3], [1, 0]])  # (row, col) of 4x4 blocks
    got, ref = bench.block_sparse_conv3x3(x, weight, blocks, 4), F.conv2d(x, weight, padding=1)
    keep = torch.zeros(12, 16, dtype=torch.bool)
    for r, c in blocks.tolist():
        keep[4 * r:4 * r + 4, 4 * c:4 * c + 4] = True
    assert got.shape == ref.shape and torch.allclose(got[..., keep], ref[..., keep], atol=1e-5)
    assert bool((got[..., ~keep] == 0).all())
    proc = run([PYTHON, os.path.join(REPO, 'scripts', 'benchmark_block_sparse_conv.py'), '--size', '64', '--block',
                '8', '32', '--repeats', '1'], cwd=tmp_path)  # the script checks exactness at every level too
    assert_stages(proc.stderr, 'block-sparse', ['2 block sizes x 5 UNet levels'])
    rows = table_rows(proc.stdout, '| block at full res |')
    assert [r[0] for r in rows] == ['8', '32']
    assert rows[0][5] == 'dense' and rows[1][5] != 'dense'  # 8 px blocks are below a pixel at level 4 (/16)
    for row in rows:
        assert float(row[6]) > 0 and 0 < float(row[7]) <= 1  # UNet estimate, share of active blocks


@pytest.mark.slow
def test_attention_benchmark_prints_each_row_when_measured(tmp_path):
    lines = run_merged([PYTHON, os.path.join(REPO, 'scripts', 'benchmark_attention.py'), '--count', '2', '--size',
                        '16', '--batch-size', '2', '--sources', 'gaussian,edge', '--device', 'cpu'], cwd=tmp_path)
    rows = [i for i, line in enumerate(lines) if line.startswith(('| gaussian', '| edge'))]
    steps = [i for i, line in enumerate(lines) if re.match(r'\[attention\] .*: [12]/2 sources', line)]
    assert len(rows) == 2 and len(steps) == 2 and rows[0] < steps[0] < rows[1] < steps[1], lines
    assert_stages('\n'.join(lines), 'attention', ['attention maps'])
