"""SRDiff (+YODA): residual conversion, sampling equivalences, network, frozen RRDB encoder,
checkpoint loading, tiled sampling, option files, and BasicSR pipeline runs (RRDB pretraining -> SRDiff)."""
import copy
import glob
import json
import os

import pytest
import torch
from torch import nn

from conftest import PYTHON, REPO, apply_overrides, mentions, run, tiny_options, train_log, write_options

from yoda_plugin.archs.srdiff_arch import SRDiffNet
from yoda_plugin.core import (DDPMSampler, DiffusionSchedule, SRDiffAdapter, YODAConfig, predict_start_from_noise,
                              q_posterior, sample)
from yoda_plugin.core.tiling import TiledDenoiser, check_tiling, tile_boxes, tile_window
from yoda_plugin.models.srdiff_model import SRDiffModel

TINY_RRDB = {'num_feat': 8, 'num_block': 2, 'num_grow_ch': 4}
TINY_NET = {'type': 'SRDiffNet', 'scale': 4, 'rrdb_num_feat': 8, 'rrdb_num_block': 2, 'rrdb_num_grow_ch': 4,
            'base_channels': 8, 'channel_mults': [1, 2], 'num_res_blocks': 1}


pytestmark = pytest.mark.usefixtures('one_thread')


def srdiff_options(data_root, name='srdiff', yoda=True, total_iter=4, **overrides):
    """tiny_options turned into a tiny SRDiff(+YODA) run (the same data and pipeline settings)."""
    opt = tiny_options(data_root, name=name, yoda=yoda, total_iter=total_iter)
    opt['model_type'] = 'SRDiffModel'
    opt['network_g'] = dict(TINY_NET)
    opt['diffusion'] = {'schedule': 'cosine', 'num_timesteps': 20, 'sample_steps': 4}
    opt['srdiff'] = {'res_rescale': 2.0, 'clip_input': True}
    opt['train']['freeze_rrdb'] = True
    opt['val'].update(tile_size=16, tile_overlap=8)  # 32x32 validation images: 3x3 tiles
    return apply_overrides(opt, overrides)


def make_model(is_train=False, yoda=True, path=None, train=None, val=None, sample_steps=None, net=None):
    """An SRDiffModel built in-process as BasicSR's pipeline would (CPU)."""
    opt = {
        'name': 'unit', 'model_type': 'SRDiffModel', 'scale': 4, 'num_gpu': 0, 'dist': False, 'is_train': is_train,
        'network_g': {**TINY_NET, **(net or {})},
        'diffusion': {'schedule': 'cosine', 'num_timesteps': 20, 'sample_steps': sample_steps or 20},
        'yoda': {'enabled': yoda, 'lower_bound': 0.3},
        'path': dict(path or {}),
        'val': dict(val or {}),
    }
    if is_train:
        opt['train'] = {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-2, 'weight_decay': 1e-4},
                        'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 1.0},
                        'pixel_opt': {'type': 'MaskedNoiseLoss', 'loss_weight': 1.0}, **(train or {})}
    return SRDiffModel(opt)


def batch(size=32, b=2, seed=0, attention=None, width=None):
    g = torch.Generator().manual_seed(seed)
    h, w = size, width or size
    lq = torch.rand(b, 3, h // 4, w // 4, generator=g)
    lq_up = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    gt = (lq_up + 0.1 * torch.randn(lq_up.shape, generator=g)).clamp(0, 1)
    att = torch.rand(b, 1, h, w, generator=g) if attention is None else attention
    return {'lq': lq, 'lq_up': lq_up, 'gt': gt, 'attention': att}


# -- residual space ---------------------------------------------------------------------------------------
def residual_maps(up, res_rescale=2.0, clip_input=True):
    """The SRDiff backbone's image <-> residual maps for the upsampled LR ``up`` (SRDiff's img2res / res2img)."""
    net = type('Net', (), {'size_multiple': 4})()  # the maps need no network
    return SRDiffAdapter.for_batch(net, None, None, up, 4, encode=False, res_rescale=res_rescale,
                                   clip_input=clip_input)


def to_residual(hr, up, res_rescale=2.0, clip=True):
    return residual_maps(up, res_rescale, clip).to_space(hr)


def from_residual(x0, up, res_rescale=2.0, clip=True):
    return residual_maps(up, res_rescale, clip).to_image(x0)


def test_residual_round_trip_is_exact():
    # 8-bit HR and an upsampled LR in float32, as the dataset delivers them; the conversion in float64.
    g = torch.Generator().manual_seed(0)
    hr8 = torch.randint(0, 256, (2, 3, 16, 16), generator=g)
    up8 = (hr8 + torch.randint(-60, 61, hr8.shape, generator=g)).clamp(0, 255)
    hr = (hr8.float() / 255).double()
    up = ((up8.float() + torch.rand(hr8.shape, generator=g) - 0.5).clamp(0, 255) / 255).double()
    x0 = to_residual(hr, up, res_rescale=2.0)
    assert float(x0.abs().max()) <= 1.0 and float(x0.abs().max()) > 0.5  # |HR - up| < 1/4: nothing clipped
    assert torch.equal(from_residual(x0, up, res_rescale=2.0), hr)  # HR = up(LR) + residual, bit for bit
    assert torch.equal(x0, (hr - up) * 4)  # SRDiff: ((2 HR - 1) - (2 up - 1)) * res_rescale 2
    # float32: within one rounding of the [0, 1] range
    back = from_residual(to_residual(hr.float(), up.float()), up.float())
    assert float((back.double() - hr).abs().max()) <= 2**-24
    # the model trains in the same space: its adapter is the backbone's, with the srdiff options
    model = make_model()
    model.lq, model.lq_up = torch.zeros(2, 3, 4, 4), up
    adapter = model.make_adapter(model.net_g, model.schedule, None, False)
    assert type(adapter) is SRDiffAdapter and torch.equal(adapter.to_image(adapter.to_space(hr)), hr)
    # clipping (clip_input): residuals beyond 1/4 of the range are clipped, as SRDiff's img2res
    big = to_residual(torch.ones(1), torch.zeros(1))
    assert float(big) == 1.0 and float(from_residual(torch.tensor([3.0]), torch.zeros(1))) == 0.25
    assert float(to_residual(torch.ones(1), torch.zeros(1), clip=False)) == 4.0


# -- sampling ---------------------------------------------------------------------------------------------
def plain_residual_ddpm(net, schedule, lq, lq_up, generator):
    """Reference: vanilla DDPM in SRDiff's residual space, written out step by step."""
    cond = net.project_condition(net.encode(lq))
    z = torch.randn(lq_up.shape, generator=generator)
    for k in range(schedule.num_steps, 0, -1):
        kt = torch.full((lq.shape[0], ), k, dtype=torch.long)
        eps = net.denoise(z, schedule.timesteps[kt], cond)
        x0 = predict_start_from_noise(schedule, z, kt, eps).clamp(-1, 1)
        mean, log_var = q_posterior(schedule, x0, z, kt)
        noise = torch.randn(z.shape, generator=generator)
        z = mean + ((0.5 * log_var).exp() if k > 1 else torch.zeros_like(log_var)) * noise
    return (lq_up + z.clamp(-1, 1) / 4).clamp(0, 1)


def test_yoda_off_and_full_attention_equal_plain_residual_ddpm():
    torch.manual_seed(0)
    off = make_model(yoda=False, sample_steps=6)  # T = 20 respaced to 6 steps
    on = make_model(yoda=True, sample_steps=6)
    on.net_g.load_state_dict(off.net_g.state_dict())
    data = batch(size=16, attention=torch.ones(2, 1, 16, 16))
    ref = plain_residual_ddpm(off.net_g, off.sample_schedule, data['lq'], data['lq_up'],
                              torch.Generator().manual_seed(7))
    off.feed_data(data)
    on.feed_data(data)
    out_off, out_on = off.sample(seed=7), on.sample(seed=7)
    assert torch.equal(out_off, ref)
    assert torch.equal(out_on, ref)  # A = 1: YODA is vanilla, bit for bit
    partial = make_model(yoda=True, sample_steps=6)
    partial.net_g.load_state_dict(off.net_g.state_dict())
    partial.feed_data({**data, 'attention': batch(size=16)['attention']})  # random attention: YODA changes the result
    assert not torch.equal(partial.sample(seed=7), ref)


def test_sampling_pads_unaligned_images_and_tiles():
    torch.manual_seed(0)
    deep = {'channel_mults': [1, 1, 1, 1]}  # 3 downsamplings: HR sizes must be multiples of 8
    model = make_model(val={'tile_size': 16, 'tile_overlap': 8}, sample_steps=3, net=deep)
    assert model.align == 8 and model.opt['val']['tile_size'] == 16  # the options are read, not edited
    model.feed_data(batch(size=36, width=28, b=1))  # 9x7 LR: HR 36x28, padded to 40x32 and cropped back
    out = model.sample(seed=1)
    assert out.shape == (1, 3, 36, 28) and bool(torch.isfinite(out).all())
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match=mentions('val.tile_size', 'multiple of 8', 'got 20')):
        make_model(val={'tile_size': 20, 'tile_overlap': 8}, net=deep)
    with pytest.raises(ValueError, match=mentions('val.sparse.mode', "'tiles'")):
        make_model(val={'sparse': {'enabled': True, 'mode': 'tiles'}})
    with pytest.raises(ValueError, match=mentions('diffusion.continuous_noise_level', 'false', 'SRDiffModel')):
        SRDiffModel({'diffusion': {'continuous_noise_level': True}})


# -- network ----------------------------------------------------------------------------------------------
def test_network_shapes_and_conditioning():
    torch.manual_seed(0)
    net = SRDiffNet(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    z, lq, t = torch.randn(2, 3, 24, 16), torch.rand(2, 3, 6, 4), torch.tensor([1, 20])
    assert net(z, lq, t).shape == z.shape
    feats = net.encode(lq)
    assert net.cond_feature_indices == (2, ) and [f.shape for f in feats] == [(2, 8, 6, 4)]
    cond = net.project_condition(feats)
    assert cond.shape == (2, 8, 24, 16)
    assert torch.equal(net.project_condition(feats, (8, 24, 4, 12)), cond[:, :, 8:24, 4:12])  # exact per tile
    with pytest.raises(ValueError, match='not divisible by 4'):
        net(torch.randn(1, 3, 26, 16), torch.rand(1, 3, 6, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match='integer tensor'):
        net(z, lq, torch.tensor([0.5, 0.5]))
    # SRDiff's defaults: RRDB 32/8/16, features [2::3], U-Net 64 x [1, 2, 2, 4]
    full = SRDiffNet()
    assert full.cond_feature_indices == (2, 5, 8) and full.size_multiple == 8
    assert full.cond_proj.in_channels == 96 and full.cond_proj.out_channels == 64
    x2 = SRDiffNet(scale=2, rrdb_num_feat=8, rrdb_num_block=2, rrdb_num_grow_ch=4, base_channels=8,
                   channel_mults=[1, 2], num_res_blocks=1, norm_groups=4, use_attn=True, attn_heads=2,
                   attn_head_channels=4)
    assert x2(torch.randn(1, 3, 16, 16), torch.rand(1, 3, 8, 8), torch.tensor([3])).shape == (1, 3, 16, 16)


def test_frozen_encoder_gets_no_gradient_and_stays_unchanged():
    torch.manual_seed(0)
    model = make_model(is_train=True)
    net = model.net_g
    enc_before = [p.detach().clone() for p in net.encoder_parameters()]
    unet_before = [p.detach().clone() for p in net.unet.parameters()]
    model.feed_data(batch())
    model.optimize_parameters(1)
    assert all(p.grad is None and not p.requires_grad for p in net.rrdb.parameters())
    assert all(torch.equal(a, p) for a, p in zip(enc_before, net.encoder_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(unet_before, net.unet.parameters()))
    ema = dict(model.net_g_ema.named_parameters())
    assert all(torch.equal(ema[n], p) for n, p in net.named_parameters() if n.startswith('rrdb.'))
    assert not any(p is q for g in model.optimizer_g.param_groups for p in g['params'] for q in net.rrdb.parameters())
    # train.freeze_rrdb: false trains the trunk (the unused RRDB head stays frozen)
    torch.manual_seed(0)
    free = make_model(is_train=True, train={'freeze_rrdb': False})
    free.feed_data(batch())
    free.optimize_parameters(1)
    assert all(p.grad is not None for p in free.net_g.encoder_parameters())
    assert all(p.grad is None for p in free.net_g.rrdb_head_parameters())


# -- RRDB checkpoints -------------------------------------------------------------------------------------
def test_load_basicsr_rrdbnet_checkpoint_and_errors(tmp_path):
    from basicsr.archs.rrdbnet_arch import RRDBNet
    torch.manual_seed(1)
    rrdb = RRDBNet(3, 3, scale=4, **TINY_RRDB)
    path = str(tmp_path / 'rrdb.pth')
    torch.save({'params': rrdb.state_dict()}, path)  # as BasicSR's save_network writes it
    model = make_model(is_train=True, path={'pretrain_network_rrdb': path})
    for name, value in rrdb.state_dict().items():
        assert torch.equal(model.net_g.rrdb.state_dict()[name], value)
        assert torch.equal(model.net_g_ema.rrdb.state_dict()[name], value)  # the EMA copy starts from it
    with pytest.raises(FileNotFoundError, match=mentions('missing.pth', 'train_rrdb_srdiff_pretrain')):
        make_model(is_train=True, path={'pretrain_network_rrdb': str(tmp_path / 'missing.pth')})
    wide = str(tmp_path / 'wide.pth')
    torch.save({'params': RRDBNet(3, 3, scale=4, num_feat=16, num_block=2, num_grow_ch=4).state_dict()}, wide)
    with pytest.raises(ValueError, match=mentions('wide.pth', 'shape', 'rrdb_num_feat')):
        make_model(is_train=True, path={'pretrain_network_rrdb': wide})
    deep = str(tmp_path / 'deep.pth')
    torch.save({'params': RRDBNet(3, 3, scale=4, num_feat=8, num_block=3, num_grow_ch=4).state_dict()}, deep)
    with pytest.raises(ValueError, match='unexpected key'):
        make_model(is_train=True, path={'pretrain_network_rrdb': deep})
    with pytest.raises(KeyError, match='no entry'):
        make_model(is_train=True, path={'pretrain_network_rrdb': path, 'param_key_rrdb': 'params_ema'})
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot load'):
        make_model(is_train=True, path={'pretrain_network_rrdb': str(junk)})


# -- tiling -----------------------------------------------------------------------------------------------
def test_tile_layout_and_windows():
    boxes = tile_boxes(40, 56, 16, 8, align=4)
    assert all(b % 4 == 0 for box in boxes for b in box)
    cover = torch.zeros(40, 56, dtype=torch.float64)
    for box in boxes:
        w = tile_window(40, 56, box, 16, 8, 2, align=4)
        assert w.shape == (box[1] - box[0], box[3] - box[2]) and float(w.min()) >= 0 and float(w.max()) <= 1
        cover[box[0]:box[1], box[2]:box[3]] += w
    assert torch.allclose(cover, torch.ones_like(cover))  # complementary ramps: a partition of unity
    assert tile_boxes(16, 12, 32, 8) == [(0, 16, 0, 12)]
    assert check_tiling(64, 16) == (64, 16, 4)
    with pytest.raises(ValueError, match='tile_overlap'):
        check_tiling(16, 16)


def test_tiled_sampling_equals_whole_image_for_a_local_denoiser():
    torch.manual_seed(0)
    # conv-only toy denoiser: receptive radius 2 (two 3x3 convs), time-dependent output
    toy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))

    def local(z, k):
        return toy(z) * (1 + k.view(-1, 1, 1, 1).float() / 10)

    schedule = DiffusionSchedule.from_options('cosine', 20)  # respaced to 6 steps by the sampler
    H, W = 32, 40
    zeros = torch.zeros(1, 3, H, W)
    att = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(1))
    cfg = YODAConfig(lower_bound=0.3)

    def run(denoise, config, attention):
        sampler = DDPMSampler(schedule, 6)
        sampler = config.wrap(sampler, attention, zeros) if config is not None else sampler
        return sample(lambda z, k, mask: denoise(z, k), sampler, zeros, torch.Generator().manual_seed(3))

    with torch.no_grad():
        for attention, config in ((None, None), (att, cfg)):
            whole = run(local, config, attention)
            tiled_fn = TiledDenoiser(lambda z, k, box: local(z, k), H, W, 16, overlap=8, margin=2, align=4)
            assert tiled_fn.num_tiles == 3 * 4
            tiled = run(tiled_fn, config, attention)
            assert torch.equal(tiled, whole)
        # the margin matters: with predictions from the tile edges (margin 0) the result differs
        edge = TiledDenoiser(lambda z, k, box: local(z, k), H, W, 16, overlap=8, margin=0, align=4)
        assert not torch.equal(run(edge, None, None), run(local, None, None))


# -- option files -----------------------------------------------------------------------------------------
OPTION_FILES = ('train_srdiff_yoda.yml', 'train_srdiff.yml', 'train_rrdb_srdiff_pretrain.yml', 'test_srdiff_yoda.yml',
                'test_srdiff.yml')


class LocalUNet(nn.Module):
    """Stands in for SRDiff's U-Net: two 3x3 convolutions of (z_t, condition), receptive field radius 2."""

    def __init__(self, cond_channels):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3 + cond_channels, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, z_t, t, cond_hr):
        return self.body(torch.cat([z_t, cond_hr], 1)) * 0.1 + 0.01 * t.view(-1, 1, 1, 1)


@torch.no_grad()
def test_sparse_tiled_sampling_equals_dense_with_a_local_unet():
    """val.sparse in SRDiffModel: crops of the active regions, tiled inside, condition cropped to match."""
    att = torch.zeros(2, 1, 64, 64)
    att[0, 0, 4:12, 4:20] = 1.0  # two separate blobs: several crops in the early steps
    att[0, 0, 44:60, 40:60] = 0.9
    att[1, 0, 20:28, 8:16] = 0.7
    outputs = {}
    for name, sparse in (('dense', None), ('sparse', {'enabled': True, 'margin': 4, 'max_fraction': 0.9,
                                                      'region_cost': 0}),
                         ('narrow', {'enabled': True, 'margin': 0, 'max_fraction': 0.9, 'region_cost': 0})):
        val = {'tile_size': 32, 'tile_overlap': 16, 'tile_margin': 4}
        if sparse:
            val['sparse'] = sparse
        torch.manual_seed(0)  # the same encoder weights for the three models
        model = make_model(val=val, sample_steps=10)
        net = model.get_bare_model(model.net_g)
        net.unet = LocalUNet(net.cond_proj.out_channels)
        model.feed_data(batch(size=64, attention=att))
        outputs[name] = model.sample(seed=5)
        if sparse:
            stats = model.sparse_stats
            assert stats['cropped_calls'] > 0 and stats['crops'] > stats['cropped_calls'], stats
            assert stats['pixels'] < stats['dense_pixels']
    assert torch.allclose(outputs['dense'], outputs['sparse'], atol=1e-5), \
        float((outputs['dense'] - outputs['sparse']).abs().max())
    assert not torch.allclose(outputs['dense'], outputs['narrow'], atol=1e-5)  # the test can tell


def test_option_files_are_consistent():
    from yoda_plugin.utils.options import load_options
    opts = {}
    for f in OPTION_FILES:
        path = os.path.join(REPO, 'options', f)
        with open(path, encoding='utf-8') as fh:
            assert fh.readline().strip() == 'yoda_plugin: !!python/name:yoda_plugin.__version__'
        opts[f] = load_options(path)
    pre = opts['train_rrdb_srdiff_pretrain.yml']['network_g']
    assert opts['train_rrdb_srdiff_pretrain.yml']['model_type'] == 'SRModel' and pre['type'] == 'RRDBNet'
    for f in OPTION_FILES[:2] + OPTION_FILES[3:]:
        o = opts[f]
        net = o['network_g']
        assert o['model_type'] == 'SRDiffModel' and o['scale'] == net['scale'] == pre['scale'] == 4
        assert (net['rrdb_num_feat'], net['rrdb_num_block'], net['rrdb_num_grow_ch']) == \
            (pre['num_feat'], pre['num_block'], pre['num_grow_ch'])
        assert net['base_channels'] == 64 and net['channel_mults'] == [1, 2, 2, 4]
        assert o['diffusion']['num_timesteps'] == 100 and o['diffusion']['schedule'] == 'cosine'
        assert o['yoda']['enabled'] == ('yoda' in f)
        for m in o['val']['metrics'].values():
            assert m['crop_border'] == 0
            assert m.get('test_y_channel', False) is False  # RGB (LPIPS and the colour shift are RGB anyway)
    for f in OPTION_FILES[:2]:
        t = opts[f]['datasets']['train']
        assert t['gt_size'] == 160 and t['batch_size_per_gpu'] == 16 and opts[f]['train']['optim_g']['type'] == 'AdamW'
        assert opts[f]['path']['pretrain_network_rrdb'].startswith(
            f'experiments/{opts["train_rrdb_srdiff_pretrain.yml"]["name"]}/models/')
    # the paper-size network builds: SRDiff's ~11M parameters (RRDB encoder 1.5M of them)
    net = SRDiffNet(**{k: v for k, v in opts['train_srdiff_yoda.yml']['network_g'].items() if k != 'type'})
    assert 10e6 < sum(p.numel() for p in net.parameters()) < 12e6


# -- BasicSR pipeline -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rrdb_pretraining_then_srdiff_yoda_training(tiny_data, tmp_path):
    # 1. RRDB encoder pretraining: BasicSR's own SRModel + RRDBNet, 2 iterations
    pre = tiny_options(tiny_data, name='rrdb_pre', yoda=False, total_iter=2)
    pre['model_type'] = 'SRModel'
    pre['network_g'] = {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'scale': 4, **TINY_RRDB}
    del pre['diffusion'], pre['yoda']
    pre['train'].update(ema_decay=0, optim_g={'type': 'Adam', 'lr': 2e-4},
                        pixel_opt={'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'})
    pre['val'] = {'val_freq': 2, 'save_img': False,
                  'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}}
    pre['logger']['save_checkpoint_freq'] = 2
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', write_options(tmp_path / 'pre.yml', pre)], cwd=tmp_path)
    rrdb_ckpt = tmp_path / 'experiments' / 'rrdb_pre' / 'models' / 'net_g_latest.pth'
    pretrained = torch.load(rrdb_ckpt, map_location='cpu', weights_only=True)['params']
    assert 'Validation tiny_val' in train_log(tmp_path / 'experiments' / 'rrdb_pre')

    # 2. SRDiff + YODA loading that checkpoint, 4 iterations, tiled validation, checkpoints
    opt = srdiff_options(tiny_data, name='srdiff_yoda', path__pretrain_network_rrdb=str(rrdb_ckpt))
    run([PYTHON, '-m', 'yoda_plugin', 'train', '-opt', write_options(tmp_path / 'srdiff.yml', opt)], cwd=tmp_path)
    exp = tmp_path / 'experiments' / 'srdiff_yoda'
    log = train_log(exp)
    assert any(f'loaded {len(pretrained)} RRDB' in line and str(rrdb_ckpt) in line for line in log.splitlines()), log
    assert 'Validation tiny_val' in log and '# psnr' in log and 'mask_ratio' in log
    assert "'tile_size': 16" in log
    for f in ('net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth'):
        ckpt = torch.load(exp / 'models' / f, map_location='cpu', weights_only=True)
        assert set(ckpt) == {'params', 'params_ema', 'yoda_record'}  # the record: options that rebuild it
        assert ckpt['yoda_record']['model_type'] == 'SRDiffModel' and 'srdiff' in ckpt['yoda_record']
    final = torch.load(exp / 'models' / 'net_g_4.pth', map_location='cpu', weights_only=True)
    for key in ('params', 'params_ema'):  # frozen: the encoder is still the pretrained one
        assert all(torch.equal(final[key][f'rrdb.{k}'], v) for k, v in pretrained.items())
    assert glob.glob(str(exp / 'visualization' / 'val_00' / 'val_00_4.png'))
    state = torch.load(exp / 'training_states' / '4.state', map_location='cpu', weights_only=True)
    assert state['iter'] == 4

    # 3. testing the EMA weights through BasicSR's test pipeline, whole images (no tiles), sparse sampling
    test = copy.deepcopy(opt)
    test['name'] = 'test_srdiff_yoda'
    test['datasets'] = {'test_1': test['datasets']['val']}
    del test['train'], test['logger']
    test['path'] = {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                    'strict_load_g': True}
    test['val'].pop('val_freq')
    test['val'].update(tile_size=None, tile_overlap=0, sparse={'enabled': True, 'margin': 4, 'region_cost': 0})
    run([PYTHON, '-m', 'yoda_plugin', 'test', '-opt', write_options(tmp_path / 'test.yml', test)], cwd=tmp_path)
    summary = json.load(open(tmp_path / 'results' / 'test_srdiff_yoda' / 'summary_tiny_val.json'))
    assert summary['images'] == 2 and summary['yoda']['enabled'] and summary['update_ratio'] < 1.0
    assert 0 < summary['metrics']['psnr'] < 100 and summary['sample_steps'] == 4
    assert 0 < summary['sparse_pixels'] <= 1  # val.sparse through the pipeline, reported


def test_option_files_parse_with_basicsr_loader():
    """BasicSR's runners read options with PyYAML's full Loader (its first line imports the plugin;
    tests/test_sr3_pipeline.py checks that import in a fresh process)."""
    import yaml
    for f in OPTION_FILES:
        with open(os.path.join(REPO, 'options', f), encoding='utf-8') as fh:
            opt = yaml.load(fh, Loader=yaml.Loader)
        import yoda_plugin
        assert opt['yoda_plugin'] == yoda_plugin.__version__ and opt['scale'] == 4


# -- the shared pipeline and fast paths -------------------------------------------------------------------
def _record_unet_dtypes(model):
    """The dtypes the U-Net of the trained and of the sampling network compute in (forward hooks)."""
    seen = []
    for net in {id(n): n for n in (model.get_bare_model(model.net_g), model.sampling_net())}.values():
        net.unet.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_amp_bf16_training_step_and_sampling():
    """train.amp / val.amp reach SRDiff (bf16 autocast on the CPU); loss and output stay float32."""
    torch.manual_seed(0)
    model = make_model(is_train=True, train={'amp': 'bf16'}, val={'amp': 'bf16', 'tile_size': 16, 'tile_overlap': 8},
                       sample_steps=4)
    assert model.grad_scaler is None and model.pipeline.amp_dtype == torch.bfloat16
    seen = _record_unet_dtypes(model)
    before = [p.detach().clone() for p in model.net_g.unet.parameters()]
    model.feed_data(batch())
    model.optimize_parameters(1)
    assert seen == [torch.bfloat16], 'the training step runs the network under autocast'
    assert torch.isfinite(torch.as_tensor(model.get_current_log()['l_pix']))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net_g.unet.parameters()))
    seen.clear()
    out = model.sample(seed=0)
    assert seen and set(seen) == {torch.bfloat16}, 'sampling runs the network under autocast'
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32) and bool(torch.isfinite(out).all())
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(model.sample(seed=0), out)
    plain = make_model(is_train=True, sample_steps=4)
    plain.net_g_ema.load_state_dict(model.net_g_ema.state_dict())
    plain.feed_data(batch())
    assert (plain.sample(seed=0) - out).abs().max() < 0.1  # bf16 rounding, same model
    fp16 = make_model(is_train=True, train={'amp': 'fp16'})
    assert fp16.grad_scaler is not None
    with pytest.raises(ValueError, match=mentions('val.amp', 'bf16', 'fp16', "'int8'")):
        make_model(val={'amp': 'int8'})


def test_channels_last_and_compile_match_the_plain_model():
    """SRDiff's fast paths change memory layout / wrap ``denoise``, not results (compile: the eager backend)."""
    results = []
    for train, val in (({}, {}), ({'channels_last': True}, {'channels_last': True}),
                       ({'compile': {'backend': 'eager'}}, {'compile': {'backend': 'eager'}})):
        torch.manual_seed(0)
        model = make_model(is_train=True, train=train, val={'tile_size': 16, 'tile_overlap': 8, **val},
                           sample_steps=4)
        if 'compile' in val:
            assert model.net_g_ema._yoda_compiled and 'denoise' in vars(model.net_g_ema)
            assert 'denoise' in vars(model.get_bare_model(model.net_g))
        if 'channels_last' in val:
            weight = next(p for p in model.net_g_ema.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1)
            assert model.pipeline.channels_last and weight.is_contiguous(memory_format=torch.channels_last)
            assert not weight.is_contiguous()
        torch.manual_seed(1)
        model.feed_data(batch())
        model.optimize_parameters(1)
        results.append((float(model.get_current_log()['l_pix']), model.sample(seed=0),
                        sorted(model.get_bare_model(model.net_g).state_dict())))
    base = results[0]
    for loss, out, keys in results[1:]:
        assert loss == pytest.approx(base[0], rel=1e-5, abs=1e-6)
        assert torch.allclose(out, base[1], atol=1e-4)
        assert keys == base[2], 'checkpoint keys must not change'
    with pytest.raises(ValueError, match='val.compile'):
        make_model(val={'compile': 'yes'})


@pytest.mark.parametrize('sampler', [{'type': 'ddim', 'steps': 5}, {'type': 'ddim', 'steps': 5, 'eta': 1.0},
                                     {'type': 'dpmpp_2m', 'steps': 5}], ids=['ddim', 'ddim-eta1', 'dpmpp_2m'])
def test_val_sampler_through_the_model(sampler):
    torch.manual_seed(0)
    model = make_model(val={'sampler': sampler})
    assert model.pipeline.steps == 5 and model.sample_schedule.num_steps == 5
    model.feed_data(batch(size=16))
    model.test(seed=2)
    out = model.output
    assert out.shape == (2, 3, 16, 16) and bool(torch.isfinite(out).all())
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    model.test(seed=2)
    assert torch.equal(model.output, out)
    ddpm = make_model(sample_steps=5)
    ddpm.net_g.load_state_dict(model.net_g.state_dict())
    ddpm.feed_data(batch(size=16))
    assert not torch.equal(ddpm.sample(seed=2), out), 'the sampler option is used'
    with pytest.raises(ValueError, match=r'val\.sampler\.tpye'):
        make_model(val={'sampler': {'tpye': 'ddim'}})
    with pytest.raises(ValueError, match=mentions('val.sampler.steps', 'diffusion.num_timesteps=20', '21')):
        make_model(val={'sampler': {'type': 'ddim', 'steps': 21}})


class _Images(torch.utils.data.Dataset):
    """A dataset of synthetic batches as BasicSR's validation reads it (one image per index)."""
    opt = {'name': 'unit'}

    def __init__(self, n, size, attention):
        data = batch(size=size, b=n, attention=attention)
        self.items = [{k: v[i] for k, v in data.items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {**self.items[i], 'lq_path': f'img_{i}.png'}


def test_sparse_sampling_runs_and_is_reported(tmp_path):
    """val.sparse through SRDiffModel.sample and the validation report (sparse_pixels, the sampler)."""
    from types import SimpleNamespace
    att = torch.zeros(2, 1, 32, 32)
    att[:, :, 4:12, 8:20] = 1.0
    torch.manual_seed(0)
    model = make_model(val={'sparse': {'enabled': True, 'margin': 4, 'region_cost': 0}, 'save_img': False},
                       path={'results_root': str(tmp_path), 'visualization': str(tmp_path / 'vis')}, sample_steps=5)
    model.feed_data(batch(attention=att))
    out = model.sample(seed=0)
    assert out.shape == (2, 3, 32, 32) and bool(torch.isfinite(out).all())
    stats = model.sparse_stats
    assert stats['cropped_calls'] > 0 and 0 < stats['pixels'] < stats['dense_pixels'], stats
    model.nondist_validation(SimpleNamespace(dataset=_Images(2, 32, att)), 0, None, False)
    assert 0 < model.val_extra['sparse_pixels'] < 1 and model.val_extra['update_ratio'] < 1
    summary = json.load(open(tmp_path / 'summary_unit.json'))
    assert summary['sparse_pixels'] == model.val_extra['sparse_pixels'] and summary['images'] == 2
    assert summary['sampler'] == {'type': 'ddpm', 'steps': None, 'eta': 0.0} and summary['sample_steps'] == 5
    rows = open(tmp_path / 'metrics_unit.csv').read().splitlines()
    assert rows[0] == 'image,update_ratio,seconds,sparse_pixels' and len(rows) == 3
    dense = make_model(sample_steps=5)
    dense.net_g.load_state_dict(model.net_g.state_dict())
    dense.feed_data(batch(attention=att))
    dense.sample(seed=0)
    assert dense.sparse_stats is None  # val.sparse off: no counters


def test_models_are_siblings_sharing_one_base():
    from yoda_plugin.models.base_model import DiffusionSRModel
    from yoda_plugin.models.sr3_model import SR3Model
    assert issubclass(SRDiffModel, DiffusionSRModel) and issubclass(SR3Model, DiffusionSRModel)
    assert not issubclass(SRDiffModel, SR3Model) and not issubclass(SR3Model, SRDiffModel)
    for name in ('optimize_parameters', 'sample', 'test', 'apply_loss', 'save_network', 'load_network',
                 'nondist_validation', 'model_to_device'):
        assert name not in vars(SRDiffModel) and name not in vars(SR3Model), f'{name} is shared, not overridden'


def test_build_pipeline_from_srdiff_options(tmp_path):
    """The inference builder parses SRDiff's sections with SRDiffModel's defaults and checks."""
    from yoda_plugin.archs import build_network
    from yoda_plugin.checkpoints import load_network_weights
    from yoda_plugin.config import build_pipeline
    torch.manual_seed(0)
    model = make_model(sample_steps=4, val={'tile_size': 16, 'tile_overlap': 8})
    model.opt['path'] = {'models': str(tmp_path)}
    model.save_network(model.net_g, 'net_g', 1)
    opt = {'model_type': 'SRDiffModel', 'scale': 4, 'network_g': dict(TINY_NET),
           'diffusion': {'schedule': 'cosine', 'num_timesteps': 20, 'sample_steps': 4},
           'yoda': {'enabled': True, 'lower_bound': 0.3}, 'val': {'tile_size': 16, 'tile_overlap': 8}}
    net = build_network(opt)
    load_network_weights(net, str(tmp_path / 'net_g_1.pth'), 'params_ema')  # falls back to params; encoder too
    pipe = build_pipeline(net, opt)
    assert pipe.backbone == 'srdiff' and pipe.steps == 4 and pipe.tiling.tile_size == 16
    data = batch(size=16)
    model.feed_data(data)
    out, _ = pipe(data['lq'], data['lq_up'], data['attention'], torch.Generator().manual_seed(3))
    assert torch.equal(out, model.sample(seed=3))
    assert build_pipeline(net, {**opt, 'diffusion': {'num_timesteps': 20}}).steps == 20  # SRDiff: all T steps
    with pytest.raises(ValueError, match=mentions('diffusion.continuous_noise_level', 'false', 'SRDiffModel')):
        build_pipeline(net, {**opt, 'diffusion': {'continuous_noise_level': True}})
    with pytest.raises(ValueError, match=r'srdiff\.res_rescal'):
        build_pipeline(net, {**opt, 'srdiff': {'res_rescal': 2}})
