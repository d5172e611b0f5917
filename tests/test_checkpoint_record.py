"""Checkpoints that describe themselves, the ``sr`` command and the API it shares its defaults with.

A tiny SR3 (+ YODA) network is written with the record training writes; everything runs in-process on the CPU.
"""
import os
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from conftest import assert_mentions, mentions, tiny_options, write_options

from yoda_plugin.archs.sr3_unet_arch import SR3UNet
from yoda_plugin.checkpoints import load_network_weights
from yoda_plugin.utils.options import load_options
from yoda_plugin.checkpoints.public import JANSPIRY_SR3, PUBLISHED_FILES, convert_checkpoint, public_key_map
from yoda_plugin.checkpoints.record import (RECORD_KEY, RecordError, compare_record, make_record, read_record,
                                            record_options)


def _net(opt, seed=0):
    torch.manual_seed(seed)
    return SR3UNet(**{k: v for k, v in opt['network_g'].items() if k != 'type'})


@pytest.fixture
def recorded(tiny_data, tmp_path):
    """(options, checkpoint with a record, the same weights without one, an LR image file 12x10)."""
    opt = tiny_options(tiny_data, name='rec', yoda=True)
    state = _net(opt).state_dict()
    ckpt = str(tmp_path / 'net_g_4.pth')
    torch.save({'params': state, 'params_ema': state, RECORD_KEY: make_record(opt)}, ckpt)
    old = str(tmp_path / 'old_net_g.pth')
    torch.save({'params': state, 'params_ema': state}, old)
    lr = (np.random.default_rng(1).random((12, 10, 3)) * 255).astype(np.uint8)  # 48x40 HR: 4 tiles of 32
    image = str(tmp_path / 'lr.png')
    cv2.imwrite(image, lr[:, :, ::-1])
    return opt, ckpt, old, image


def sr_main(argv):
    from yoda_plugin.apps.sr import main
    return main(argv + ['--device', 'cpu', '--quiet'])


def test_the_record_round_trips_and_basicsr_still_reads_the_file(recorded):
    opt, ckpt, _, _ = recorded
    record = read_record(ckpt)
    assert record['format'] == 1 and record['scale'] == 4 and record['network_g'] == opt['network_g']
    assert record['attention'] == {'source': {'name': 'edge'}} and record['resize'] == 'pil'
    assert compare_record(record, opt) == [] and compare_record(record, record_options(record)) == []
    assert compare_record(record, {**opt, 'network_g': {**opt['network_g'], 'base_channels': 8}}) == [
        'network_g.base_channels']
    # BasicSR's own loader reads params / params_ema and ignores the record.
    from basicsr.models.base_model import BaseModel
    model = object.__new__(BaseModel)
    model.opt = {'dist': False}
    net = _net(opt, seed=5)
    BaseModel.load_network(model, net, ckpt, strict=True, param_key='params_ema')
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), _net(opt).state_dict().values()))


def test_the_convergence_export_uses_the_same_schema(tiny_data):
    from yoda_plugin.experiments.convergence import checkpoint_record
    opt = tiny_options(tiny_data, yoda=True)
    plan = SimpleNamespace(iters=8, batch_sizes=[4], options='/x/train_sr3_yoda_demo.yml',
                           sampler={'type': 'ddpm', 'steps': 2, 'eta': 0.0})
    record = checkpoint_record(opt, plan, 'yoda', 0, {'psnr': 20.0})
    # The record's sampler is the demo's test sampler; the validation says which sampler measured it.
    from yoda_plugin.demo import options_dir
    test_sampler = load_options(os.path.join(options_dir(), 'test_sr3_yoda_demo.yml'))['val']['sampler']
    assert record['sampler'] == test_sampler
    assert {k: v for k, v in record.items() if k not in ('training', 'validation')} == \
        make_record(dict(opt, val=dict(opt['val'], sampler=test_sampler)))
    assert record['training']['iterations'] == 8 and record['validation']['psnr'] == 20.0
    assert record['validation']['sampler'] == plan.sampler


def test_command_line_and_api_give_the_same_pixels_with_the_shared_defaults(recorded, tmp_path, capsys):
    from yoda_plugin import YODAResolver
    from yoda_plugin.data.image_io import read_image
    opt, ckpt, _, image = recorded
    resolver = YODAResolver.from_checkpoint(ckpt, device='cpu')  # no option file: the record
    api = resolver(read_image(image))  # the default seed
    info = resolver.last_info
    assert info['tiles'] == 4 and info['update_share'] == info['update_ratio'] and 0 < info['update_share'] < 1
    assert info['steps'] == 5 and info['sampler_name'] == 'ddpm' and info['sparse_note'] is None
    assert sr_main([image, '-o', str(tmp_path / 'out'), '--checkpoint', ckpt]) == 0
    cli = cv2.imread(str(tmp_path / 'out' / 'lr.png'))[:, :, ::-1]
    assert np.array_equal(cli, api)
    err = capsys.readouterr().err
    assert_mentions(err, 'lr.png: 10x12 -> 40x48', 'sampler ddpm', '5 steps', '4 tile(s)', ' s -> ',
                    f'update share {info["update_share"]:.3f}')
    # The option file that made it gives the same pixels as its record.
    from_opt = YODAResolver.from_options(write_options(tmp_path / 'o.yml', opt), ckpt, device='cpu')
    assert np.array_equal(from_opt(read_image(image)), api)


def test_existing_outputs_are_kept_unless_overwrite(recorded, tmp_path, capsys):
    _, ckpt, _, image = recorded
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'lr.png').write_bytes(b'mine')
    assert sr_main([image, '-o', str(out), '--checkpoint', ckpt, '--steps', '1']) == 2
    err = capsys.readouterr().err
    assert_mentions(err, str(out / 'lr.png'), '--overwrite')
    assert err.count('\n') == 1 and 'Traceback' not in err and (out / 'lr.png').read_bytes() == b'mine'
    assert sr_main([image, '-o', str(out), '--checkpoint', ckpt, '--steps', '1', '--overwrite']) == 0
    assert cv2.imread(str(out / 'lr.png')).shape == (48, 40, 3)


def test_a_checkpoint_without_record_needs_its_option_file(recorded, tmp_path, capsys):
    from yoda_plugin import YODAResolver
    opt, _, old, image = recorded
    with pytest.raises(RecordError, match=mentions(old, '--opt')):
        YODAResolver.from_checkpoint(old, device='cpu')
    assert sr_main([image, '-o', str(tmp_path / 'a'), '--checkpoint', old]) == 2
    err = capsys.readouterr().err
    assert_mentions(err, old, '--opt')
    assert err.count('\n') == 1 and 'Traceback' not in err
    opt_file = write_options(tmp_path / 'o.yml', opt)
    assert sr_main([image, '-o', str(tmp_path / 'b'), '--checkpoint', old, '--opt', opt_file, '--steps', '1']) == 0


def test_an_option_file_that_disagrees_is_named_key_by_key(recorded, tmp_path, capsys):
    from yoda_plugin import YODAResolver
    opt, ckpt, _, image = recorded
    wrong = write_options(tmp_path / 'wrong.yml', {**opt, 'network_g': {**opt['network_g'], 'base_channels': 8},
                                                   'diffusion': {**opt['diffusion'], 'num_timesteps': 50}})
    with pytest.raises(RecordError, match=mentions(ckpt, 'wrong.yml', 'network_g.base_channels',
                                                   'diffusion.num_timesteps')):
        YODAResolver.from_options(wrong, ckpt, device='cpu')
    assert sr_main([image, '-o', str(tmp_path / 'a'), '--checkpoint', ckpt, '--opt', wrong]) == 2
    err = capsys.readouterr().err
    assert_mentions(err, 'network_g.base_channels', 'diffusion.num_timesteps', 'wrong.yml')
    assert err.count('\n') == 1
    # How it is sampled may differ (YODA's lower bound): a note, and the option file's value is used.
    other = write_options(tmp_path / 'other.yml', {**opt, 'yoda': {'enabled': True, 'lower_bound': 0.6}})
    resolver = YODAResolver.from_options(other, ckpt, device='cpu')
    assert resolver.pipeline.yoda.lower_bound == 0.6
    assert any('yoda.lower_bound' in note for note in resolver.notes)


def test_sparse_sampling_that_runs_dense_says_why(recorded):
    from yoda_plugin import YODAResolver
    from yoda_plugin.data.image_io import read_image
    _, ckpt, _, image = recorded
    lr = read_image(image)
    off = YODAResolver.from_checkpoint(ckpt, device='cpu', yoda=False, sampler={'type': 'ddim', 'steps': 1},
                                       sparse={'enabled': True, 'mode': 'regions', 'margin': 4})
    assert any('YODA is off' in note for note in off.notes)
    off(lr)
    assert 'YODA is off' in off.last_info['sparse_note'] and off.last_info['update_share'] == 1.0
    dense = YODAResolver.from_checkpoint(ckpt, device='cpu', sampler={'type': 'ddim', 'steps': 2},
                                         sparse={'enabled': True, 'mode': 'bbox', 'margin': 64})
    dense(lr)
    stats = dense.last_info['sparse_stats']
    assert stats['cropped_calls'] == 0
    assert_mentions(dense.last_info['sparse_note'], 'dense', 'max_fraction', '64-pixel margin')


def test_missing_published_weights_say_where_and_how_to_convert(tmp_path, capsys):
    path = str(tmp_path / 'pretrained' / 'sr3_16_128' / 'I640000_E37_gen.pth')
    net = SR3UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[], image_size=16,
                  norm_groups=4)
    expected = mentions(path, 'Janspiry/Image-Super-Resolution-via-Iterative-Refinement', 'docs/published-weights.md',
                        'python scripts/convert_checkpoint.py --format janspiry-sr3')
    with pytest.raises(FileNotFoundError, match=expected):
        load_network_weights(net, path)
    srdiff = str(tmp_path / 'pretrained' / 'srdiff_pretrained_div2k' / 'basicsr.pth')  # the converted file's place
    from yoda_plugin.apps.sr import main
    img = tmp_path / 'x.png'
    cv2.imwrite(str(img), np.zeros((4, 4, 3), np.uint8))
    capsys.readouterr()
    assert main([str(img), '-o', str(tmp_path / 'o'), '--checkpoint', srdiff, '--quiet']) == 2
    err = capsys.readouterr().err
    assert_mentions(err, srdiff, 'model_ckpt_steps_400000.ckpt', 'LeiaLi/SRDiff', '--format srdiff')
    assert err.count('\n') == 1
    assert set(PUBLISHED_FILES) == {'I640000_E37_gen.pth', 'sr3_64_512_gen.pth', 'model_ckpt_steps_400000.ckpt'}


def test_converted_published_weights_carry_a_record(tmp_path):
    from yoda_plugin import YODAResolver
    network_g = dict(type='SR3UNet', in_channels=6, out_channels=3, base_channels=8, channel_mults=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], image_size=16, dropout=0.0, norm_groups=4,
                     noise_proj_silu=False, attn_qkv_bias=False, noise_affine=False)
    torch.manual_seed(0)
    net = SR3UNet(**{k: v for k, v in network_g.items() if k != 'type'})
    names = public_key_map(network_g, JANSPIRY_SR3)
    src = str(tmp_path / 'I10_E1_gen.pth')
    torch.save({names[k]: v for k, v in net.state_dict().items()}, src)
    out = str(tmp_path / 'converted.pth')
    convert_checkpoint(src, out, JANSPIRY_SR3, image_size=16, norm_groups=4, scale=4)
    record = read_record(out)
    assert record['scale'] == 4 and record['model_type'] == 'SR3Model' and record['network_g'] == network_g
    assert record['converted_from']['file'] == 'I10_E1_gen.pth' and not (record['yoda'] or {}).get('enabled')
    resolver = YODAResolver.from_checkpoint(out, device='cpu', sampler={'type': 'ddim', 'steps': 1})
    assert resolver(np.zeros((4, 4, 3), np.uint8)).shape == (16, 16, 3)


def test_main_help_lists_every_command_and_exits_0(monkeypatch, capsys):
    from yoda_plugin import __main__ as entry
    monkeypatch.setattr(sys, 'argv', ['yoda_plugin', '--help'])
    assert entry.main() == 0
    out = capsys.readouterr().out
    for name in ('sr', 'demo', 'train', 'test', 'prepare', 'precompute', 'gpu_check'):
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in out.splitlines()), name
    monkeypatch.setattr(sys, 'argv', ['yoda_plugin', 'nonsense'])
    assert entry.main() == 2 and "'nonsense'" in capsys.readouterr().err
    monkeypatch.setattr(sys, 'argv', ['yoda_plugin', 'sr', '--help'])
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert_mentions(out, '--checkpoint', '--opt', '--overwrite', '--steps', '--tile', '--colour-fix', 'no option file')
    monkeypatch.setattr(sys, 'argv', ['yoda_plugin', 'demo', '--help'])
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 0 and 'converged' in capsys.readouterr().out


def test_the_shipped_demo_checkpoints_carry_a_record():
    from yoda_plugin.apps.sr import SHIPPED, checkpoint_path
    for name in SHIPPED:
        record = read_record(checkpoint_path(name))
        assert record['model_type'] == 'SR3Model' and record['scale'] == 4 and os.path.isfile(checkpoint_path(name))
