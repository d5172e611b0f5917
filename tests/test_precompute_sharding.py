"""scripts/precompute_attention.py and yoda_plugin.attention.precompute: torchrun sharding and shard merging,
resuming, previews, --device."""
import importlib.util
import os
import subprocess

import cv2
import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, assert_mentions, load_precompute_script, raw_values, run_env
from yoda_plugin.attention import build_attention_source
from yoda_plugin.attention.precompute import build_source, merge_shards, resolve_device, source_takes_device
from yoda_plugin.attention.previews import colorize, preview_name, preview_strip, preview_tiles
from yoda_plugin.data.attention_lmdb import AttentionLMDBWriter, make_attention_meta, read_meta_info

SCRIPT = os.path.join(REPO, 'scripts', 'precompute_attention.py')
KEYS = [f'im{i}' for i in range(6)]
SIZE = (24, 20)  # (h, w)


@pytest.fixture(scope='module')
def script():
    """The command line (its main()), run in-process."""
    return load_precompute_script('precompute_attention_sharding')


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """In-process calls of main() must not think they are a torchrun rank."""
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)


def write_images(folder, corrupt=None):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, key in enumerate(KEYS):
        img = np.full(SIZE + (3, ), 80, np.uint8)
        cv2.rectangle(img, (2 + i, 4), (14, 18), (int(rng.integers(150, 255)), 40, 200), -1)
        cv2.imwrite(str(folder / f'{key}.png'), img)
    if corrupt:
        (folder / f'{corrupt}.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    return folder


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """A single-process run over the six images: the values every sharded run must reproduce byte for byte."""
    root = tmp_path_factory.mktemp('reference')
    write_images(root / 'lr')
    out = root / 'ref.lmdb'
    script = load_precompute_script('precompute_attention_sharding')
    assert script.main(['--input', str(root / 'lr'), '--output', str(out), '--source', 'edge', '--no-progress']) == 0
    values = raw_values(out)
    assert sorted(values) == KEYS
    return {'values': values, 'meta_info': (out / 'meta_info.txt').read_text()}


def torchrun(*args, cwd, timeout=120):
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', SCRIPT, *map(str, args),
           '--no-progress']
    return subprocess.run(cmd, cwd=str(cwd), env=run_env(), capture_output=True, text=True, timeout=timeout)


def edge_meta():
    return make_attention_meta(build_attention_source('edge'), grid='lr')


def put_raw(path, values, keys):
    with AttentionLMDBWriter(str(path), edge_meta()) as writer:
        for key in keys:
            writer.put_encoded(key.encode(), values[key])


def interrupted_state(tmp_path, values):
    """What an interrupted 2-process run leaves: rank 1 finished its shard (im1, im3, im5) and the merge had
    committed im0 and im1 into the output when it stopped; rank 0's shard holds only im0 (it was interrupted
    too); a stale rank2 shard (an earlier 3-process attempt) holds im2."""
    out = tmp_path / 'att.lmdb'
    put_raw(out, values, ['im0', 'im1'])
    shards = tmp_path / 'att.lmdb.shards'
    put_raw(shards / 'rank0.lmdb', values, ['im0'])
    put_raw(shards / 'rank1.lmdb', values, ['im1', 'im3', 'im5'])
    put_raw(shards / 'rank2.lmdb', values, ['im2'])
    assert [row[0] for row in read_meta_info(str(out))] == ['im0', 'im1']
    return out, shards


def check_complete(out, reference):
    assert raw_values(out) == reference['values']  # every key once, the same bytes as a single-process run
    assert (out / 'meta_info.txt').read_text() == reference['meta_info']
    assert [row[0] for row in read_meta_info(str(out))] == KEYS
    assert not os.path.exists(str(out) + '.shards')  # shards merged and removed


# --------------------------------------------------------------------------- real torchrun runs


@pytest.mark.slow
def test_torchrun_two_ranks_merge_into_one_lmdb_with_previews(tmp_path, reference):
    lr = write_images(tmp_path / 'lr', corrupt='im0b')  # sorted position 1: handled (and failed) by rank 1
    out = tmp_path / 'att.lmdb'
    proc = torchrun('--input', lr, '--output', out, '--source', 'edge', '--previews', tmp_path / 'previews',
                    '--preview-count', 3, '--batch-size', 2, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log  # an image failed on rank 1: every rank, and torchrun, exit non-zero
    assert '[rank 1] failed im0b' in log
    assert_mentions(log, 'merged 2 shard(s)', '6 key(s) added', '0 already present')
    assert_mentions(log, 'written 6', 'skipped 0', 'failed 1')  # rank 0's summary counts both ranks
    assert '  im0b: ' in log
    check_complete(out, reference)

    # previews of the first 3 keys (im0, im0b: unreadable, skipped, im1): LR | edge map, 128 px high
    names = sorted(os.listdir(tmp_path / 'previews'))
    assert names == ['im0.png', 'im1.png']
    tile_width = round(SIZE[1] * 128 / SIZE[0])
    for name in names:
        strip = cv2.imread(str(tmp_path / 'previews' / name), cv2.IMREAD_UNCHANGED)
        assert strip is not None and strip.dtype == np.uint8
        assert strip.shape == (128, 2 * tile_width, 3)


@pytest.mark.slow
def test_torchrun_resumes_an_interrupted_merge(tmp_path, reference):
    lr = write_images(tmp_path / 'lr')
    out, shards = interrupted_state(tmp_path, reference['values'])
    proc = torchrun('--input', lr, '--output', out, '--source', 'edge', cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    # rank 0 recomputes im2 and im4 (its shard lacks them); rank 1 skips all of its keys
    assert_mentions(log, 'written 2', 'skipped 4', 'failed 0')
    assert_mentions(log, 'merged 3 shard(s)', '4 key(s) added', '3 already present')
    check_complete(out, reference)


# --------------------------------------------------------------------------- in-process


def test_single_process_run_finishes_an_interrupted_sharded_run(tmp_path, reference, script, capsys):
    lr = write_images(tmp_path / 'lr')
    out, shards = interrupted_state(tmp_path, reference['values'])
    assert script.main(['--input', str(lr), '--output', str(out), '--source', 'edge', '--no-progress']) == 0
    printed = capsys.readouterr().out
    assert 'merged 3 shard(s): 3 key(s) added, 2 already present' in printed
    assert 'written 1, skipped 5' in printed  # only im4 was in no shard
    check_complete(out, reference)


def test_merge_refuses_a_shard_of_another_configuration(tmp_path, reference, script, capsys):
    lr = write_images(tmp_path / 'lr')
    other = make_attention_meta(build_attention_source('edge', blur_sigma=0.1), grid='lr')
    with AttentionLMDBWriter(str(tmp_path / 'att.lmdb.shards' / 'rank0.lmdb'), other) as writer:
        writer.put('im0', np.zeros(SIZE))
    assert script.main(['--input', str(lr), '--output', str(tmp_path / 'att.lmdb'), '--source', 'edge',
                        '--no-progress']) == 2
    assert 'source.blur_sigma' in capsys.readouterr().err
    assert os.path.isdir(tmp_path / 'att.lmdb.shards' / 'rank0.lmdb')  # left for the user to inspect


def test_merge_grows_the_map_and_commits_in_chunks(tmp_path):
    rng = np.random.default_rng(1)
    maps = {f'k{i:02d}': rng.random((48, 48)) for i in range(30)}  # incompressible: ~4.6 KiB each
    with AttentionLMDBWriter(str(tmp_path / 'o.lmdb.shards' / 'rank3.lmdb'), edge_meta()) as shard:
        for key, amap in maps.items():
            shard.put(key, amap)
    with AttentionLMDBWriter(str(tmp_path / 'o.lmdb'), edge_meta(), map_size=32 * 1024) as writer:
        writer.put('k00', maps['k00'])
        assert merge_shards(writer, str(tmp_path / 'o.lmdb'), chunk=7, log=lambda *a: None) == (1, 29, 1)
        assert writer.map_size > 32 * 1024 and len(writer) == 30
    assert not os.path.exists(tmp_path / 'o.lmdb.shards')
    assert [row[0] for row in read_meta_info(str(tmp_path / 'o.lmdb'))] == sorted(maps)


def test_previews_of_deterministic_and_dino_sources(tmp_path):
    image = np.zeros((16, 12, 3), np.uint8)
    image[4:12, 3:9] = 200
    source = build_attention_source('sift')
    strip = preview_strip(image, preview_tiles(source, image))
    assert strip.shape == (128, 2 * 96, 3) and strip.dtype == np.uint8
    # the second tile is the viridis colouring of the map, enlarged with nearest neighbour (labels aside)
    expected = cv2.resize(colorize(source(image)), (96, 128), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(strip[40:, 96:], expected[40:])

    class FakeDino:  # the interface preview_tiles uses: batch_head_maps and heads
        heads = 'max'

        def batch_head_maps(self, images):
            h, w = images[0].shape[:2]
            return [np.stack([np.full((h, w), k / 5.0, np.float32) for k in range(6)])]

    tiles = preview_tiles(FakeDino(), image)
    assert [label for label, _ in tiles] == [f'head {k}' for k in range(6)] + ['MAX']
    assert preview_strip(image, tiles).shape == (128, 8 * 96, 3)
    FakeDino.heads = 2
    assert preview_tiles(FakeDino(), image)[-1][0] == 'used: head 2'
    assert preview_name('a/b c') == 'a_b_c.png'


def test_device_option(tmp_path, script, capsys):
    assert build_source('edge', {}, 'cuda').config()['name'] == 'edge'  # deterministic sources ignore --device
    with pytest.raises(ValueError, match='not a torch device'):
        build_source('edge', {}, 'not-a-device')
    assert str(resolve_device('cpu', local_rank=1)) == 'cpu'
    assert str(resolve_device(None)) == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert source_takes_device('dino_vits8') and not source_takes_device('sift')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda')
    # a DINO source receives the device; missing weights are a setup error (exit 2), not a traceback
    for var in ('YODA_DINO_VITS8', ):
        os.environ.pop(var, None)
    write_images(tmp_path / 'lr')
    code = script.main(['--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'o.lmdb'), '--source',
                        'dino_vits8', '--source-opt', f'weights={tmp_path / "nowhere.pth"}', '--device', 'cpu'])
    assert code == 2 and 'nowhere.pth' in capsys.readouterr().err


def test_benchmark_script_prints_the_table(capsys):
    spec = importlib.util.spec_from_file_location('benchmark_attention', os.path.join(REPO, 'scripts',
                                                                                       'benchmark_attention.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(['--count', '3', '--size', '16', '--batch-size', '2', '--sources', 'gaussian,edge',
                       '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert '| source | runs on | maps/s | decode % | compute % | write % |' in out
    rows = [line for line in out.splitlines() if line.startswith('| gaussian') or line.startswith('| edge')]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip('|').split('|')]
        shares = [float(c) for c in cells[3:6]]
        assert float(cells[2].replace(',', '')) > 0 and abs(sum(shares) - 100.0) < 0.5
    assert '120,000 maps' in out and '1,000 maps/s' in out
