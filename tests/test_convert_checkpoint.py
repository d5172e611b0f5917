"""Published SR3 (Janspiry) and SRDiff checkpoints: arch options, layout detection, conversion, direct loading.

Small random networks are written in each public file layout (Janspiry SR3 current, Janspiry SR3 scale-shift,
official SRDiff: key names, schedule buffers and containers as those code bases save them) and must load
strictly through ``convert_checkpoint`` and through ``load_network_weights`` (``path.pretrain_network_g``),
giving the same weights and outputs. The key names of the public layouts are hand-checked here; that the
mapped networks compute what the original code computes was checked against that code outside the
repository (docs/published-weights.md, "How it was checked").
"""
import glob
import importlib.util
import os

import pytest
import torch
import yaml

from conftest import REPO, mentions

from yoda_plugin.archs.sr3_unet_arch import ResBlock, SR3UNet
from yoda_plugin.archs.srdiff_arch import SRDiffNet
from yoda_plugin.checkpoints import (JANSPIRY_SR3, SRDIFF, convert_checkpoint, detect_format, public_key_map,
                                     read_public_checkpoint)
from yoda_plugin.core.schedule import make_beta_schedule
from yoda_plugin.models.checkpoint import load_network_weights

SR3_SMALL = dict(type='SR3UNet', in_channels=6, out_channels=3, base_channels=16, channel_mults=[1, 2, 2],
                 num_res_blocks=2, attn_resolutions=[8], image_size=16, dropout=0.0, norm_groups=8,
                 noise_proj_silu=False, attn_qkv_bias=False, noise_affine=False)
SRDIFF_SMALL = dict(type='SRDiffNet', scale=4, num_in_ch=3, num_out_ch=3, rrdb_num_feat=8, rrdb_num_block=5,
                    rrdb_num_grow_ch=4, cond_feature_indices=None, base_channels=8, channel_mults=[1, 2, 3],
                    num_res_blocks=2, norm_groups=0, use_attn=True, attn_heads=4, attn_head_channels=4,
                    time_offset=-1)


def _build(network_g):
    cls = {'SR3UNet': SR3UNet, 'SRDiffNet': SRDiffNet}[network_g['type']]
    return cls(**{k: v for k, v in network_g.items() if k != 'type'})


def _randomize(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # GroupNorm, gates and all: every tensor must land in its place
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _betas(kind):
    if kind == JANSPIRY_SR3:
        return make_beta_schedule('linear', 2000, 1e-6, 1e-2).float()
    return make_beta_schedule('cosine', 100, cosine_s=0.008).float()


def _public_file(net, network_g, fmt, path):
    """``net``'s weights saved as the public code base saves them."""
    names = public_key_map(network_g, fmt)
    state = {names[k]: v.clone() for k, v in net.state_dict().items()}
    betas = _betas(fmt)
    state.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))  # two of their schedule buffers
    if fmt == JANSPIRY_SR3:
        torch.save(state, path)  # Janspiry's save_network: the GaussianDiffusion state dict
    else:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
        torch.save({'global_step': 400000, 'optimizer_states': [opt.state_dict()], 'state_dict': {'model': state}},
                   path, _use_new_zipfile_serialization=False)  # SRDiff's save_checkpoint
    return str(path)


def _inputs(network_g, seed=0):
    g = torch.Generator().manual_seed(seed)
    if network_g['type'] == 'SR3UNet':
        return (torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g),
                torch.rand(2, generator=g))
    return (torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 4, 4, generator=g),
            torch.randint(1, 101, (2, ), generator=g))


LAYOUTS = {
    'janspiry-current': (JANSPIRY_SR3, SR3_SMALL),
    'janspiry-scale-shift': (JANSPIRY_SR3, {**SR3_SMALL, 'noise_affine': True}),
    'srdiff-official': (SRDIFF, SRDIFF_SMALL),
}


# -- arch options -------------------------------------------------------------------------------------------------

def test_arch_options_default_to_todays_networks():
    sr3 = SR3UNet(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[64], image_size=128,
                  norm_groups=8)
    assert sr3.mid[1].qkv.bias is not None and sr3.down[0].emb_proj.out_features == 16
    assert sr3.down[0].proj_silu and not sr3.down[0].affine
    assert SRDiffNet().time_offset == 0
    for bad in ({'noise_affine': 1}, {'attn_qkv_bias': 'no'}):
        (key, value), = bad.items()
        with pytest.raises(ValueError, match=mentions(f'network_g.{key}', 'true or false', repr(value))):
            SR3UNet(**bad)
    with pytest.raises(ValueError, match=mentions('network_g.time_offset', 'integer', '0.5')):
        SRDiffNet(time_offset=0.5)


def test_resblock_conditioning_by_hand(one_thread):
    torch.manual_seed(0)
    x, emb = torch.randn(1, 8, 4, 4), torch.randn(1, 8)
    for proj_silu in (True, False):
        for affine in (False, True):
            block = ResBlock(8, 8, 8, 0.0, 4, proj_silu, affine).eval()
            h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
            e = block.emb_proj(torch.nn.functional.silu(emb) if proj_silu else emb)[:, :, None, None]
            h = (1 + e[:, :8]) * h + e[:, 8:] if affine else h + e  # scale-shift: gamma first, then beta
            want = x + block.conv2(torch.nn.functional.silu(block.norm2(h)))
            assert torch.allclose(block(x, emb), want, atol=1e-6), (proj_silu, affine)
    assert ResBlock(8, 8, 8, 0.0, 4, affine=True).emb_proj.out_features == 16


def test_srdiff_time_offset_shifts_the_time_input(one_thread):
    shifted = _randomize(SRDiffNet(**{k: v for k, v in SRDIFF_SMALL.items() if k != 'type'}), 1).eval()
    plain = SRDiffNet(**{**{k: v for k, v in SRDIFF_SMALL.items() if k != 'type'}, 'time_offset': 0}).eval()
    plain.load_state_dict(shifted.state_dict())
    z, lq, t = _inputs(SRDIFF_SMALL)
    with torch.no_grad():
        assert torch.equal(shifted(z, lq, t), plain(z, lq, t - 1))
        assert not torch.allclose(shifted(z, lq, t), plain(z, lq, t))


# -- key names of the public layouts (hand-checked against their code) ------------------------------------------------

def test_public_key_names():
    sr3 = public_key_map(SR3_SMALL, JANSPIRY_SR3)
    assert sr3['conv_in.weight'] == 'denoise_fn.downs.0.weight'
    assert sr3['noise_mlp.0.weight'] == 'denoise_fn.noise_level_mlp.1.weight'
    assert sr3['noise_mlp.2.bias'] == 'denoise_fn.noise_level_mlp.3.bias'
    assert sr3['down.0.emb_proj.weight'] == 'denoise_fn.downs.1.res_block.noise_func.noise_func.0.weight'
    assert sr3['down.0.conv1.weight'] == 'denoise_fn.downs.1.res_block.block1.block.3.weight'
    assert sr3['down.0.norm2.bias'] == 'denoise_fn.downs.1.res_block.block2.block.0.bias'
    assert sr3['down.2.conv.weight'] == 'denoise_fn.downs.3.conv.weight'           # level 0: 2 blocks, then down
    assert sr3['down.3.skip.weight'] == 'denoise_fn.downs.4.res_block.res_conv.weight'
    assert sr3['down.4.qkv.weight'] == 'denoise_fn.downs.4.attn.qkv.weight'         # level 1 (8x8) is attended
    assert sr3['down.6.proj.bias'] == 'denoise_fn.downs.5.attn.out.bias'
    assert sr3['mid.1.norm.weight'] == 'denoise_fn.mid.0.attn.norm.weight'
    assert sr3['mid.2.conv2.weight'] == 'denoise_fn.mid.1.res_block.block2.block.3.weight'
    assert sr3['up.0.skip.weight'] == 'denoise_fn.ups.0.res_block.res_conv.weight'
    assert sr3['up.3.conv.weight'] == 'denoise_fn.ups.3.conv.weight'                # 3 blocks on level 2, then up
    assert sr3['norm_out.weight'] == 'denoise_fn.final_conv.block.0.weight'
    assert sr3['conv_out.bias'] == 'denoise_fn.final_conv.block.3.bias'
    assert len(set(sr3.values())) == len(sr3)
    srd = public_key_map(SRDIFF_SMALL, SRDIFF)
    assert srd['cond_proj.weight'] == 'denoise_fn.cond_proj.weight'
    assert srd['unet.time_mlp.2.weight'] == 'denoise_fn.mlp.2.weight'
    assert srd['unet.downs.0.0.1.block2.conv.weight'] == 'denoise_fn.downs.0.1.block2.block.1.weight'
    assert srd['unet.downs.1.0.0.emb_proj.1.bias'] == 'denoise_fn.downs.1.0.mlp.1.bias'
    assert srd['unet.downs.1.0.0.skip.weight'] == 'denoise_fn.downs.1.0.res_conv.weight'
    assert srd['unet.downs.0.1.conv.weight'] == 'denoise_fn.downs.0.2.conv.1.weight'
    assert srd['unet.mid1.block1.conv.bias'] == 'denoise_fn.mid_block1.block1.block.1.bias'
    assert srd['unet.mid_attn.gate'] == 'denoise_fn.mid_attn.fn.g'
    assert srd['unet.mid_attn.qkv.weight'] == 'denoise_fn.mid_attn.fn.fn.to_qkv.weight'
    assert srd['unet.ups.0.1.weight'] == 'denoise_fn.ups.0.2.conv.0.weight'
    assert srd['unet.final.0.conv.weight'] == 'denoise_fn.final_conv.0.block.1.weight'
    assert srd['unet.final.1.bias'] == 'denoise_fn.final_conv.1.bias'
    assert srd['rrdb.body.4.rdb3.conv5.weight'] == 'rrdb.RRDB_trunk.4.RDB3.conv5.weight'
    assert srd['rrdb.conv_body.weight'] == 'rrdb.trunk_conv.weight'
    assert srd['rrdb.conv_hr.bias'] == 'rrdb.HRconv.bias' and srd['rrdb.conv_up2.weight'] == 'rrdb.upconv2.weight'
    assert len(set(srd.values())) == len(srd)


# -- every public layout loads strictly, converted and direct -----------------------------------------------------

@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_public_layout_loads_strictly_converted_and_direct(layout, tmp_path, one_thread, basicsr_log):
    fmt, network_g = LAYOUTS[layout]
    original = _randomize(_build(network_g), 3).eval()
    src = _public_file(original, network_g, fmt, tmp_path / 'public.pth')
    assert detect_format(torch.load(src, weights_only=True)) == fmt

    ckpt = convert_checkpoint(src, str(tmp_path / 'converted.pth'), fmt=fmt, image_size=16,
                              norm_groups=network_g.get('norm_groups'))
    blocks = yaml.safe_load(ckpt.option_blocks())
    assert list(blocks)[-1] == 'network_g' and blocks['network_g'] == network_g
    if fmt == JANSPIRY_SR3:
        assert ckpt.variant == ('scale-shift' if network_g['noise_affine'] else 'additive')
        assert blocks['diffusion'] == {'schedule': 'linear', 'num_timesteps': 2000, 'linear_start': 1e-6,
                                       'linear_end': 1e-2, 'sample_steps': 2000, 'variance': 'posterior',
                                       'clip_denoised': True, 'continuous_noise_level': True}
    else:
        assert blocks['diffusion']['schedule'] == 'cosine' and blocks['diffusion']['num_timesteps'] == 100
        assert blocks['diffusion']['continuous_noise_level'] is False and blocks['srdiff']['res_rescale'] == 2.0
    saved = torch.load(str(tmp_path / 'converted.pth'), weights_only=True)
    # The record rebuilds network and pipeline; an SR3 of an unpublished configuration has no known scale.
    assert sorted(saved) == ['params', 'params_ema'] + (['yoda_record'] if fmt == SRDIFF else [])

    converted, direct = _build(blocks['network_g']).eval(), _build(network_g).eval()
    load_network_weights(converted, str(tmp_path / 'converted.pth'), 'params_ema', strict=True)
    load_network_weights(direct, src, 'params_ema', strict=True)
    assert any('published' in line and fmt in line for line in basicsr_log)
    for net in (converted, direct):
        for (k, a), b in zip(original.state_dict().items(), net.state_dict().values()):
            assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(original(*_inputs(network_g)), direct(*_inputs(network_g)))


def _script_main():
    spec = importlib.util.spec_from_file_location('convert_checkpoint_script',
                                                  os.path.join(REPO, 'scripts', 'convert_checkpoint.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_prints_network_block_last_and_never_overwrites(tmp_path, capsys):
    fmt, network_g = LAYOUTS['janspiry-scale-shift']
    src = _public_file(_randomize(_build(network_g), 4), network_g, fmt, tmp_path / 'I10_E1_gen.pth')
    out = tmp_path / 'out.pth'
    args = ['--format', 'janspiry-sr3', src, str(out), '--image-size', '16', '--norm-groups', '8']
    main = _script_main()
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = printed.rstrip('\n').split('\n')
    start = lines.index('network_g:')
    assert all(line.startswith('  ') for line in lines[start + 1:])  # the block is the last output
    assert yaml.safe_load('\n'.join(lines[start:]))['network_g'] == network_g
    assert 'scale-shift' in printed and 'wrote' in printed
    before = out.read_bytes()
    assert main(args) == 2
    assert '--force' in capsys.readouterr().err and out.read_bytes() == before
    assert main(args + ['--force']) == 0


def test_convert_refuses_bad_requests(tmp_path):
    fmt, network_g = LAYOUTS['srdiff-official']
    src = _public_file(_build(network_g), network_g, fmt, tmp_path / 'model_ckpt_steps_1.ckpt')
    with pytest.raises(ValueError, match=mentions('model_ckpt_steps_1.ckpt', 'janspiry-sr3', '--format srdiff')):
        convert_checkpoint(src, str(tmp_path / 'a.pth'), fmt=JANSPIRY_SR3)
    with pytest.raises(ValueError, match=mentions('model_ckpt_steps_1.ckpt', 'input')):
        convert_checkpoint(src, src, force=True)
    basicsr = tmp_path / 'basicsr.pth'
    torch.save({'params': {}}, basicsr)
    with pytest.raises(ValueError, match='BasicSR checkpoint'):
        convert_checkpoint(str(basicsr), str(tmp_path / 'b.pth'))
    assert not (tmp_path / 'a.pth').exists() and not (tmp_path / 'b.pth').exists()


class _Pickled:
    pass


def test_unsafe_file_names_the_trust_switch(tmp_path):
    fmt, network_g = LAYOUTS['janspiry-current']
    src = _public_file(_build(network_g), network_g, fmt, tmp_path / 'x_gen.pth')
    state = torch.load(src, weights_only=True)
    state['extra'] = _Pickled()  # a Python object: refused by torch.load(weights_only=True)
    torch.save(state, src)
    with pytest.raises(ValueError, match='trust_checkpoint: true') as info:
        convert_checkpoint(src, str(tmp_path / 'out.pth'), image_size=16, norm_groups=8)
    assert 'weights_only=True' in str(info.value) and '--trust-checkpoint' in str(info.value)
    with pytest.raises(ValueError, match='non-tensor entries'):  # trusted, it loads; the object is then named
        convert_checkpoint(src, str(tmp_path / 'out.pth'), trusted=True, image_size=16, norm_groups=8)


def test_script_names_its_own_trust_switch(tmp_path, capsys):
    fmt, network_g = LAYOUTS['janspiry-current']
    src = _public_file(_build(network_g), network_g, fmt, tmp_path / 'x_gen.pth')
    state = torch.load(src, weights_only=True)
    state['extra'] = _Pickled()
    torch.save(state, src)
    assert _script_main()([src, str(tmp_path / 'out.pth'), '--image-size', '16', '--norm-groups', '8']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'x_gen.pth' in err and '--trust-checkpoint on this command' in err
    assert 'trust_checkpoint: true' not in err and 'YODAResolver' not in err and 'inference_yoda' not in err
    assert not (tmp_path / 'out.pth').exists()


# -- wrong configurations and partial loads ------------------------------------------------------------------------

@pytest.mark.parametrize('layout, change, named', [
    ('janspiry-current', {'channel_mults': [1, 2, 4]}, 'network_g.channel_mults is [1, 2, 4] in the option file '
                                                       'but the file needs [1, 2, 2]'),
    ('janspiry-current', {'noise_proj_silu': True}, 'network_g.noise_proj_silu is true'),
    ('janspiry-current', {'attn_resolutions': [16]}, 'network_g.attn_resolutions is [16]'),
    ('janspiry-scale-shift', {'noise_affine': False}, 'network_g.noise_affine is false'),
    ('srdiff-official', {'time_offset': 0}, 'network_g.time_offset is 0'),
    ('srdiff-official', {'rrdb_num_block': 8}, 'network_g.rrdb_num_block is 8'),
], ids=['mults', 'silu', 'attention', 'scale-shift', 'time-offset', 'rrdb'])
def test_wrong_network_g_names_the_settings(layout, change, named, tmp_path):
    fmt, network_g = LAYOUTS[layout]
    src = _public_file(_build(network_g), network_g, fmt, tmp_path / 'public.pth')
    wrong = _build({**network_g, **change})
    with pytest.raises(ValueError) as info:
        load_network_weights(wrong, src, 'params', strict=True)
    msg = str(info.value)
    assert named in msg and 'public.pth' in msg and ('Janspiry SR3' in msg or 'official SRDiff' in msg)
    assert yaml.safe_load(msg.split('prints them):\n', 1)[1])['network_g'] == network_g  # the block that fits
    with pytest.raises(ValueError, match=mentions('public.pth', 'network_g.type: ')):
        load_network_weights(torch.nn.Linear(2, 2), src, 'params')


def test_partial_load_lists_every_dropped_key_and_refuses_few(tmp_path, basicsr_log, one_thread):
    fmt, network_g = LAYOUTS['janspiry-current']
    original = _randomize(_build(network_g), 5)
    src = _public_file(original, network_g, fmt, tmp_path / 'public.pth')
    other = _build({**network_g, 'out_channels': 6})  # only the last conv differs
    load_network_weights(other, src, 'params', strict=False)
    warning = [line for line in basicsr_log if 'strict_load is false: loaded' in line]
    total = len(other.state_dict())
    assert warning and f'loaded {total - 2} of {total} tensors' in warning[0]
    assert "'conv_out.weight', (3, 16, 3, 3), (6, 16, 3, 3)" in warning[0] and "'conv_out.bias'" in warning[0]
    assert any('network_g.out_channels is 6' in line for line in basicsr_log), basicsr_log
    assert torch.equal(other.conv_in.weight, original.conv_in.weight)
    # A BasicSR file that fills few tensors is refused even with strict_load false.
    small = _build({**network_g, 'channel_mults': [1], 'attn_resolutions': []})
    torch.save({'params': small.state_dict()}, tmp_path / 'small.pth')
    with pytest.raises(ValueError, match=mentions('small.pth', 'SR3UNet', '50%')):
        load_network_weights(_build(network_g), str(tmp_path / 'small.pth'), 'params', strict=False)
    many = [k for k in other.state_dict() if k.startswith(('down.', 'up.'))][:12]
    partial = {k: v for k, v in other.state_dict().items() if k not in many}
    torch.save({'params': partial}, tmp_path / 'partial.pth')
    basicsr_log.clear()
    load_network_weights(other, str(tmp_path / 'partial.pth'), 'params', strict=False)
    assert all(f"'{k}'" in basicsr_log[0] for k in many)  # every key, not the first few


# -- option files under options/pretrained ---------------------------------------------------------------------

PRETRAINED_OPTIONS = sorted(glob.glob(os.path.join(REPO, 'options', 'pretrained', '*.yml')))


def test_pretrained_option_files_match_the_published_layouts():
    """Each file's network_g and diffusion are what the converter reads from a file of that layout."""
    from yoda_plugin.checkpoints.public import _build_meta
    from yoda_plugin.utils.options import load_options
    names = {os.path.basename(p) for p in PRETRAINED_OPTIONS}
    for kind in ('test', 'train'):
        for yoda in ('', '_yoda'):
            for scenario in ('sr3{}_16_128_janspiry', 'sr3{}_64_512_janspiry', 'srdiff{}_x4_div2k_official'
                             if kind == 'test' else 'srdiff{}_x4_df2k_official'):
                assert f'{kind}_{scenario.format(yoda)}.yml' in names
    for path in PRETRAINED_OPTIONS:
        opt = load_options(path)
        network_g = opt['network_g']
        fmt = JANSPIRY_SR3 if network_g['type'] == 'SR3UNet' else SRDIFF
        names = public_key_map(network_g, fmt)
        meta = _build_meta(network_g).state_dict()  # shapes only: the full-size networks cost no memory
        state = {names[k]: v for k, v in meta.items()}
        state['betas'] = _betas(fmt)
        obj = state if fmt == JANSPIRY_SR3 else {'state_dict': {'model': state}}
        ckpt = read_public_checkpoint(obj, path)
        assert ckpt.published, path
        assert dict(ckpt.network_g) == network_g, path
        for key, value in ckpt.diffusion.items():
            assert opt['diffusion'][key] == value, (path, key)
        assert opt['yoda']['enabled'] == ('_yoda' in os.path.basename(path))
        if opt['yoda']['enabled']:
            assert opt['yoda']['mask_network_input'] is False, path  # a vanilla network: unmasked input
        assert opt['path']['pretrain_network_g'].startswith('pretrained/')


@pytest.mark.parametrize('name, layout', [('train_sr3_yoda_16_128_janspiry.yml', 'janspiry-scale-shift'),
                                          ('test_srdiff_yoda_x4_div2k_official.yml', 'srdiff-official')])
def test_models_start_from_the_original_file_and_yoda_applies(name, layout, tmp_path, one_thread):
    """The BasicSR models load a public file through path.pretrain_network_g (net_g and its EMA when training),
    and YODA samples with the vanilla weights; with attention 1 everywhere it equals vanilla sampling."""
    from basicsr.models import build_model
    from test_options import _basicsr_like

    from yoda_plugin.config import build_pipeline
    from yoda_plugin.utils.options import load_options
    fmt, network_g = LAYOUTS[layout]
    original = _randomize(_build(network_g), 6)
    src = _public_file(original, network_g, fmt, tmp_path / 'public.pth')
    opt = load_options(os.path.join(REPO, 'options', 'pretrained', name))
    opt['network_g'] = dict(network_g)  # the file's own (small) layout, the option file's everything else
    is_train = 'train' in opt
    mopt = _basicsr_like(opt, is_train, str(tmp_path / 'root'))
    mopt['path']['pretrain_network_g'] = src
    model = build_model(mopt)
    nets = [model.net_g] + ([model.net_g_ema] if is_train and hasattr(model, 'net_g_ema') else [])
    assert len(nets) == (2 if is_train else 1)
    for net in nets:
        for (k, a), b in zip(original.state_dict().items(), model.get_bare_model(net).state_dict().values()):
            assert torch.equal(a, b), k
    net = model.get_bare_model(model.net_g).eval()
    g = torch.Generator().manual_seed(0)
    scale = opt['scale']
    lq = torch.rand(1, 3, 16 // scale if fmt == JANSPIRY_SR3 else 4, 16 // scale if fmt == JANSPIRY_SR3 else 4,
                    generator=g)
    lq_up = torch.nn.functional.interpolate(lq, size=(16, 16), mode='bicubic', align_corners=False).clamp(0, 1)
    ones = torch.ones(1, 1, 16, 16)
    yoda = build_pipeline(net, opt, sampler={'type': 'ddpm', 'steps': 4})
    vanilla = build_pipeline(net, {**opt, 'yoda': {'enabled': False}}, sampler={'type': 'ddpm', 'steps': 4})
    assert yoda.yoda.enabled and yoda.yoda.mask_network_input is False
    out_yoda, _ = yoda(lq, lq_up, ones, torch.Generator().manual_seed(1))
    out_vanilla, _ = vanilla(lq, lq_up, None, torch.Generator().manual_seed(1))
    assert torch.equal(out_yoda, out_vanilla)
    half = torch.cat([torch.ones(1, 1, 16, 8), torch.zeros(1, 1, 16, 8)], dim=3)
    out_half, _ = yoda(lq, lq_up, half, torch.Generator().manual_seed(1))
    assert out_half.shape == out_vanilla.shape and not torch.equal(out_half, out_vanilla)
