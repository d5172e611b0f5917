"""Analysis scripts, results summary and inference on a tiny finished test run (CPU, small).

The run: a tiny SR3 checkpoint (BasicSR layout) is written directly, then tested twice through
``python -m yoda_plugin test`` (YODA on and off, in parallel), with PSNR, SSIM and LPIPS (random
AlexNet in torchvision's layout) configured: that is the "finished test run" every script reads.
"""
import csv
import importlib.util
import json
import os
import subprocess

import cv2
import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, assert_mentions, mentions, run_env, tiny_options, write_options

SCRIPTS = os.path.join(REPO, 'scripts')
# Every test reads the finished test run of the module fixture (a `yoda_plugin test` subprocess).
pytestmark = pytest.mark.slow


def load_script(rel):
    """Import a script file as a module (its ``main(argv)`` is then called in-process)."""
    path = os.path.join(SCRIPTS, rel)
    spec = importlib.util.spec_from_file_location('script_' + os.path.basename(rel)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path, min_w=100, min_h=80):
    assert os.path.isfile(path), f'{path} was not written'
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f'{path} is not a readable image'
    assert img.shape[1] >= min_w and img.shape[0] >= min_h, f'{path}: implausible size {img.shape}'
    assert img.std() > 0, f'{path} is blank'
    return img


@pytest.fixture(scope='module')
def run(tiny_data, tmp_path_factory):
    """Checkpoint, option files and two finished test runs (YODA, vanilla) in one folder."""
    root = tmp_path_factory.mktemp('finished_run')
    torch.manual_seed(0)
    import torchvision
    alexnet = str(root / 'alexnet-owt-7be5be79.pth')
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), alexnet)
    from yoda_plugin.archs.sr3_unet_arch import SR3UNet
    net_opt = dict(tiny_options(tiny_data)['network_g'])
    net_opt.pop('type')
    state = SR3UNet(**net_opt).state_dict()
    ckpt = str(root / 'net_g_latest.pth')
    torch.save({'params': state, 'params_ema': state}, ckpt)

    opt = tiny_options(tiny_data, name='test_yoda', yoda=True)
    del opt['train'], opt['logger']
    opt['datasets'] = {'test_1': opt['datasets']['val']}
    opt['path'] = {'pretrain_network_g': ckpt, 'param_key_g': 'params_ema', 'strict_load_g': True}
    opt['val'].pop('val_freq')
    opt['val']['save_attention'] = True
    opt['val']['metrics']['lpips'] = {'type': 'calculate_lpips', 'crop_border': 0, 'weights': alexnet}
    opt_path = write_options(root / 'test_yoda.yml', opt)
    proc = subprocess.run([PYTHON, '-m', 'yoda_plugin', 'test', '-opt', opt_path], cwd=root, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # A second result folder, built directly (a stand-in for a vanilla SR3 run): the bicubic images.
    from yoda_plugin.data.yoda_paired_dataset import YODAPairedDataset
    other = root / 'results' / 'test_other' / 'visualization' / 'tiny_val'
    other.mkdir(parents=True)
    ds = YODAPairedDataset({**opt['datasets']['test_1'], 'phase': 'test', 'scale': opt['scale']})
    for i in range(len(ds)):
        item = ds[i]
        img = (item['lq_up'].permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
        cv2.imwrite(str(other / f'{item["key"]}_test_other.png'), img)
    return {'root': root, 'data': tiny_data, 'ckpt': ckpt, 'alexnet': alexnet, 'opt_yoda': opt_path,
            'res_yoda': str(root / 'results' / 'test_yoda'), 'res_other': str(root / 'results' / 'test_other')}


def test_report_has_lpips_and_table(run, capsys):
    res = run['res_yoda']
    rows = list(csv.DictReader(open(os.path.join(res, 'metrics_tiny_val.csv'))))
    assert len(rows) == 2 and {'psnr', 'ssim', 'lpips', 'update_ratio'} <= set(rows[0])
    assert all(0 < float(r['lpips']) < 2 for r in rows)
    summary = json.load(open(os.path.join(res, 'summary_tiny_val.json')))
    assert set(summary['metrics']) == {'psnr', 'ssim', 'lpips'} and 0 < summary['update_ratio'] < 1
    # A vanilla-style summary next to it (hand-made) for the table's second row.
    vanilla = run['root'] / 'results' / 'test_vanilla'
    vanilla.mkdir(exist_ok=True)
    json.dump({'dataset': 'tiny_val', 'images': 2, 'metrics': {'PSNR': 20.5, 'SSIM': 0.61, 'niqe': 5.0},
               'sample_steps': 5, 'yoda': {'enabled': False}, 'update_ratio': 1.0},
              open(vanilla / 'summary_tiny_val.json', 'w'))
    summarize = load_script('summarize_results.py')
    assert summarize.main([str(vanilla), os.path.join(res, 'summary_tiny_val.json')]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith('| run | dataset | images | PSNR') and 'LPIPS' in table[0] and 'niqe' in table[0]
    assert len(table) == 4
    assert table[2].startswith('| test_vanilla | tiny_val | 2 | 20.50 | 0.610 |  | 5.0000 | no | 100.0% | 5 |')
    cells = [c.strip() for c in table[3].split('|')[1:-1]]
    assert cells[0] == 'test_yoda' and float(cells[5]) > 0 and cells[7] == 'yes' and cells[8].endswith('%')
    assert summarize.main([str(run['root'] / 'nothing_here')]) == 1


def test_ratio_and_refined_area(run, tmp_path):
    att = os.path.join(run['data'], 'val_att.lmdb')
    att_train = os.path.join(run['data'], 'train_att.lmdb')
    ratio = load_script('analysis/ratio_of_diffused_pixels.py')
    assert ratio.main(['--opt', run['opt_yoda'], '--attention', f'edge-val={att}', '--attention',
                       f'edge-train={att_train}', '--kind', 'violin', '--out', str(tmp_path)]) == 0
    assert_png(tmp_path / 'ratio_of_diffused_pixels.png')
    # Same numbers as the model's own update_ratio in the test summary (maps resized to the HR grid).
    rows = [r for r in csv.DictReader(open(tmp_path / 'ratio_of_diffused_pixels.csv')) if r['source'] == 'edge-val']
    summary = json.load(open(os.path.join(run['res_yoda'], 'summary_tiny_val.json')))
    assert np.mean([float(r['ratio']) for r in rows]) == pytest.approx(summary['update_ratio'], abs=1e-9)

    area = load_script('analysis/refined_area_over_time.py')
    assert area.main(['--opt', run['opt_yoda'], '--attention', f'edge={att}', '--out', str(tmp_path)]) == 0
    assert_png(tmp_path / 'refined_area_over_time.png')
    # refined_share is Eq. 9 as in yoda_plugin.core
    from yoda_plugin.core import time_dependent_mask
    amap = np.random.default_rng(0).random((9, 7)).astype(np.float32)
    ts = np.arange(100, 0, -1)
    expected = [float(time_dependent_mask(torch.from_numpy(amap), 0.3, int(t), 100).mean()) for t in ts]
    assert np.allclose(area.refined_share(amap, 0.3, 100, ts), expected)


def test_intermediate_steps(run, tmp_path):
    mod = load_script('analysis/intermediate_steps.py')
    assert mod.capture_steps(200, 10)[0] == 199 and mod.capture_steps(200, 10)[-1] == 0
    assert mod.main(['--opt', run['opt_yoda'], '--checkpoint', run['ckpt'], '--num-images', '1', '--steps', '4',
                     '--out', str(tmp_path)]) == 0
    assert_png(tmp_path / 'val_00_states.png')
    assert_png(tmp_path / 'val_00_masks.png', min_h=40)


def test_error_maps(run, tmp_path):
    mod = load_script('analysis/error_maps.py')
    assert mod.main(['--opt', run['opt_yoda'], '--sr', f'other={run["res_other"]}', '--sr',
                     f'SR3+YODA={run["res_yoda"]}', '--out', str(tmp_path)]) == 0
    assert_png(tmp_path / 'error_maps.png', min_w=300)


def test_lpips_per_attention_bin_script(run, tmp_path):
    mod = load_script('analysis/lpips_per_attention_bin.py')
    assert mod.main(['--opt', run['opt_yoda'], '--sr', f'other={run["res_other"]}', '--sr',
                     f'SR3+YODA={run["res_yoda"]}', '--lpips-weights', run['alexnet'], '--device', 'cpu',
                     '--bin-width', '0.05', '--out', str(tmp_path)]) == 0
    assert_png(tmp_path / 'lpips_per_attention_bin.png')
    rows = list(csv.DictReader(open(tmp_path / 'lpips_per_attention_bin.csv')))
    assert len(rows) == 14  # [0, 1 - l) with l = 0.3 in bins of 0.05
    assert float(rows[-1]['bin_hi']) == pytest.approx(0.7)
    assert {'other', 'SR3+YODA', 'bicubic'} <= set(rows[0])
    assert any(r['SR3+YODA'] for r in rows)
    assert all((r['SR3+YODA'] == '') == (int(r['images']) == 0) for r in rows)
    assert all(r['other'] == r['bicubic'] for r in rows)  # the stand-in run holds the bicubic images


def test_lpips_per_bin_on_hand_made_arrays(run):
    mod = load_script('analysis/lpips_per_attention_bin.py')
    from yoda_plugin.metrics.lpips_metric import get_lpips_model
    model = get_lpips_model('alex', run['alexnet'], device='cpu')
    rng = np.random.default_rng(0)
    hr = rng.random((48, 48, 3)).astype(np.float32)
    sr = np.clip(hr + rng.normal(0, 0.1, hr.shape), 0, 1).astype(np.float32)
    att = np.full((48, 48), 0.105, np.float32)  # bin [0.10, 0.11)
    att[:, 24:] = 0.455                          # bin [0.45, 0.46)
    edges = mod.bin_edges(0.0, 0.6, 0.01)
    assert len(edges) == 61 and edges[-1] == 0.6
    res = mod.lpips_per_bin(hr, {'sr': sr, 'same': hr}, att, edges, model)
    filled = np.flatnonzero(np.isfinite(res['sr']))
    assert filled.tolist() == [10, 45]          # bins without pixels are skipped (NaN)
    assert (res['sr'][filled] > 0).all() and (res['same'][filled] == 0).all()
    # Masked-out regions do not matter: change HR and SR outside bin 10's region.
    hr2, sr2 = hr.copy(), sr.copy()
    hr2[:, 24:] = rng.random((48, 24, 3))
    sr2[:, 24:] = 0.0
    res2 = mod.lpips_per_bin(hr2, {'sr': sr2}, att, edges, model)
    assert res2['sr'][10] == pytest.approx(res['sr'][10], rel=1e-6, abs=1e-9)
    assert res2['sr'][45] != pytest.approx(res['sr'][45])
    coef = mod.fit_curve((edges[:-1] + edges[1:]) / 2, res['sr'])
    assert coef is not None and len(coef) == 2   # two bins with values: degree drops to 1
    assert mod.fit_curve(np.arange(3.0), np.array([np.nan, 1.0, np.nan])) is None
    with pytest.raises(ValueError):
        mod.bin_edges(0.5, 0.2, 0.01)


def test_inference_folder_with_bad_files(run, tmp_path, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    rng = np.random.default_rng(0)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)           # training size: one tile
    large = (rng.random((12, 10, 3)) * 255).astype(np.uint8)         # 48x40 HR: tiled with 32x32 tiles
    cv2.imwrite(str(folder / 'a_small.png'), small)
    cv2.imwrite(str(folder / 'b_large.jpg'), large)
    (folder / 'c_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(rng.integers(0, 255, 64, dtype=np.uint8)))
    (folder / 'd_notes.txt').write_text('not an image')
    out = tmp_path / 'out'
    mod = load_script('inference_yoda.py')
    code = mod.main([str(folder), '--output', str(out), '--opt', run['opt_yoda'], '--checkpoint', run['ckpt'],
                     '--param-key', 'params_ema', '--source', 'edge', '--seed', '3', '--device', 'cpu',
                     '--tile-overlap', '8', '--save-previews', '--quiet'])
    err = capsys.readouterr().err
    assert code == 1
    assert 'c_corrupt.png' in err and 'd_notes.txt' in err and '2 of 4 input(s) failed' in err
    assert sorted(os.listdir(out)) == ['a_small.png', 'a_small_attention.png', 'a_small_mask.png', 'b_large.png',
                                       'b_large_attention.png', 'b_large_mask.png']
    assert cv2.imread(str(out / 'a_small.png')).shape == (32, 32, 3)
    assert cv2.imread(str(out / 'b_large.png')).shape == (48, 40, 3)
    assert '4 tile(s)' in err  # 48x40 on 32x32 tiles
    mask = cv2.imread(str(out / 'b_large_mask.png'), cv2.IMREAD_GRAYSCALE)
    assert mask.min() >= 50  # the lower bound l = 0.3: every pixel is refined at >= 1 of the 5 steps (t = 20 <= 30)

    # Same seed, same output; a missing checkpoint is a setup error (2).
    again = tmp_path / 'again'
    assert mod.main([str(folder / 'a_small.png'), '-o', str(again), '--opt', run['opt_yoda'], '--checkpoint',
                     run['ckpt'], '--source', 'edge', '--seed', '3', '--device', 'cpu', '--quiet']) == 0
    assert np.array_equal(cv2.imread(str(again / 'a_small.png')), cv2.imread(str(out / 'a_small.png')))
    assert mod.main([str(folder / 'b_large.jpg'), '-o', str(again), '--opt', run['opt_yoda'], '--checkpoint',
                     run['ckpt'], '--source', 'edge', '--device', 'cpu', '--tile-overlap', '8', '--sparse', 'regions:4',
                     '--region-cost', '0', '--quiet']) == 0
    err = capsys.readouterr().err
    assert 'b_large.jpg: 10x12 -> 40x48, sampler ddpm, 5 steps, update share 0.' in err
    assert ', 4 tile(s), network on ' in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit status 2
        mod.main([str(folder), '-o', str(again), '--opt', run['opt_yoda'], '--sparse', 'tiles:4'])
    assert exit_info.value.code == 2
    assert "sparse variant 'tiles:4'" in capsys.readouterr().err
    assert mod.main([str(folder), '-o', str(again), '--opt', run['opt_yoda'], '--checkpoint',
                     str(tmp_path / 'missing.pth'), '--quiet']) == 2


def test_inference_sampling_matches_model(run, tmp_path):
    """The resolver samples as SR3Model.test does, bit for bit (same pipeline); tiled, it stays close."""
    from basicsr.models import build_model
    from torch.utils.data import default_collate

    from yoda_plugin import YODAResolver
    from yoda_plugin.data.yoda_paired_dataset import YODAPairedDataset
    from yoda_plugin.utils.options import load_options
    opt = load_options(run['opt_yoda'])
    resolver = YODAResolver.from_options(run['opt_yoda'], run['ckpt'], 'params_ema', 'cpu')
    ds_opt = {**opt['datasets']['test_1'], 'phase': 'test', 'scale': opt['scale']}
    item = YODAPairedDataset(ds_opt)[0]
    lr = np.clip(np.round(item['lq'].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
    sr = resolver.super_resolve_one(lr, item['attention'][0], seed=7)
    model_opt = {**opt, 'is_train': False, 'dist': False, 'rank': 0, 'world_size': 1, 'num_gpu': 0,
                 'root_path': str(tmp_path), 'path': {**opt['path'], 'results_root': str(tmp_path),
                                                      'log': str(tmp_path), 'visualization': str(tmp_path)}}
    model = build_model(model_opt)
    model.feed_data(default_collate([item]))
    model.test(seed=7)
    assert torch.equal(sr, model.output)
    assert resolver.last_info['tiles'] == 1 and 0 < resolver.last_info['update_ratio'] < 1
    # Tiled (24-pixel tiles over 32x32) and sparse: each changes the computation, stays a valid image.
    tiled = YODAResolver.from_options(run['opt_yoda'], run['ckpt'], device='cpu',
                                      tiling={'tile_size': 24, 'tile_overlap': 8})
    out = tiled.super_resolve_one(lr, item['attention'][0], seed=7)
    assert tiled.last_info['tiles'] == 4 and out.shape == sr.shape and bool(torch.isfinite(out).all())
    sparse = YODAResolver.from_options(run['opt_yoda'], run['ckpt'], device='cpu', sparse={
        'enabled': True, 'mode': 'regions', 'margin': 0, 'max_fraction': 1.0, 'region_cost': 0})
    out = sparse.super_resolve_one(lr, item['attention'][0], seed=7)
    assert sparse.last_info['sparse_stats']['cropped_calls'] > 0 and not torch.equal(out, sr)


def test_resolver_api(run):
    """numpy in, numpy out; tensors in, tensors out; attention on the fly; samplers as options."""
    from yoda_plugin import YODAResolver
    rng = np.random.default_rng(2)
    lr = (rng.random((8, 10, 3)) * 255).astype(np.uint8)
    resolver = YODAResolver.from_options(run['opt_yoda'], run['ckpt'], device='cpu', sampler={'type': 'ddim',
                                                                                               'steps': 4})
    assert resolver.pipeline.steps == 4 and resolver.attention_source is not None  # the options' edge source
    out = resolver(lr, seed=1)
    assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
    assert np.array_equal(resolver(lr, seed=1), out)  # deterministic sampler and seed
    both = resolver([lr, lr], seed=1)
    assert np.array_equal(both[0], out) and not np.array_equal(both[1], out)  # image i uses seed + i
    batch = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float()[None] / 255
    t_out = resolver(batch, seed=1)
    assert t_out.shape == (1, 3, 32, 40) and t_out.dtype == torch.float32
    with pytest.raises(ValueError, match=mentions('(5, 5)', '(8, 10)', '(32, 40)')):
        resolver(lr, attention=np.zeros((5, 5), np.float32))
    given = resolver(lr, attention=np.ones((8, 10), np.float32), seed=1)  # LR-grid map, resized
    assert given.shape == out.shape and resolver.last_info['update_ratio'] == 1.0
    from yoda_plugin.utils.options import load_options
    with pytest.raises(ValueError, match='no checkpoint'):
        YODAResolver.from_options({**load_options(run['opt_yoda']), 'path': {}}, device='cpu')


def test_inference_refuses_to_overwrite_inputs(run, tmp_path, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    img = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(folder / 'photo.png'), img)
    before = (folder / 'photo.png').read_bytes()
    mod = load_script('inference_yoda.py')
    for argv in ([str(folder), '-o', str(folder)], [str(folder / 'photo.png'), '-o', str(folder)]):
        code = mod.main(argv + ['--opt', run['opt_yoda'], '--checkpoint', run['ckpt'], '--device', 'cpu', '--quiet'])
        assert code == 2
        assert_mentions(capsys.readouterr().err, 'photo.png', 'overwrite')
    assert (folder / 'photo.png').read_bytes() == before and os.listdir(folder) == ['photo.png']
    # With a suffix the outputs go next to the inputs without touching them.
    assert mod.main([str(folder), '-o', str(folder), '--suffix', '_sr', '--opt', run['opt_yoda'], '--checkpoint',
                     run['ckpt'], '--device', 'cpu', '--steps', '2', '--quiet']) == 0
    assert (folder / 'photo.png').read_bytes() == before and sorted(os.listdir(folder)) == ['photo.png',
                                                                                           'photo_sr.png']

