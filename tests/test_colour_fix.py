"""Colour fixes after sampling (wavelet, AdaIN): hand-made cases, and the option from val / the API / the script."""
import os

import numpy as np
import pytest
import torch

from yoda_plugin.core.colour_fix import (COLOUR_FIXES, adain_colour_fix, apply_colour_fix, check_colour_fix,
                                         low_frequency, wavelet_colour_fix)

from conftest import load_script, mentions, tiny_options, write_options


def smooth_image(seed=0, size=32, batch=2):
    """Smooth colour fields with a few sharp edges, values inside (0.15, 0.85)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    base = torch.stack([xx, yy, (xx + yy) / 2])[None].repeat(batch, 1, 1, 1)
    base = base * torch.rand(batch, 3, 1, 1, generator=g) + torch.rand(batch, 3, 1, 1, generator=g) * 0.3
    base[..., size // 4:size // 2, size // 3:size // 2 + 4] += 0.2
    return 0.15 + 0.7 * (base - base.amin()) / (base.amax() - base.amin())


def checkerboard(size, amplitude):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    return amplitude * (1 - 2 * ((yy + xx) % 2)).float()


def channel_means(x):
    return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------- the fixes

def test_adain_gives_the_reference_statistics_exactly():
    ref = smooth_image(0)
    sr = 0.5 + 0.6 * (smooth_image(1) - 0.5) + torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)
    out = adain_colour_fix(sr, ref)
    assert torch.allclose(channel_means(out), channel_means(ref), atol=1e-6)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), ref.std(dim=(2, 3), unbiased=False), atol=1e-6)
    assert not torch.allclose(channel_means(sr), channel_means(ref), atol=1e-2)
    # Structure is the SR's: AdaIN is an affine map per channel, so correlation with the SR stays 1.
    for b in range(2):
        for c in range(3):
            corr = torch.corrcoef(torch.stack([out[b, c].flatten(), sr[b, c].flatten()]))[0, 1]
            assert corr > 1 - 1e-6
    # An image with the reference's statistics (its mirror image) is left as it is.
    mirrored = ref.flip(-1)
    assert (adain_colour_fix(mirrored, ref) - mirrored).abs().max() < 1e-6
    # A flat channel takes the reference's mean.
    flat = torch.full_like(ref, 0.3)
    assert torch.allclose(channel_means(adain_colour_fix(flat, ref)), channel_means(ref), atol=1e-6)


def test_wavelet_takes_the_low_band_of_the_reference_and_keeps_detail():
    ref = smooth_image(0)
    detail = checkerboard(32, 0.05)  # the finest band: every [1, 2, 1] / 4 blur removes it exactly
    offset = torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)
    sr = ref + detail + offset
    out = wavelet_colour_fix(sr, ref)
    assert (out - (ref + detail)).abs().max() < 1e-6, 'colour offset removed, detail kept'
    assert (wavelet_colour_fix(ref, ref) - ref).abs().max() < 1e-6, 'a matching image is unchanged'
    # A different image: its channel means move to the reference's (up to the border effects of the blur).
    other = smooth_image(5)
    before = (channel_means(other) - channel_means(ref)).abs().max()
    after = (channel_means(wavelet_colour_fix(other, ref)) - channel_means(ref)).abs().max()
    assert after < 0.05 * before, (before, after)
    # Its fine detail (above the low band) is the SR's: high bands of output and SR agree.
    high = lambda x: x - low_frequency(x, 1)  # noqa: E731
    assert (high(wavelet_colour_fix(other, ref)) - high(other)).abs().max() < 0.02 * (high(other).abs().max())


def test_low_frequency_is_a_smoothing_that_keeps_constants():
    const = torch.full((1, 3, 20, 24), 0.4)
    assert (low_frequency(const) - const).abs().max() < 1e-7
    x = smooth_image(2, size=8, batch=1)  # dilations 8 and 16 exceed the image: replicated borders
    assert low_frequency(x).shape == x.shape and bool(torch.isfinite(low_frequency(x)).all())
    with pytest.raises(ValueError, match=mentions('levels', 'positive integer', 'got 0')):
        low_frequency(x, 0)


def test_apply_colour_fix_dispatches_and_clips():
    ref = smooth_image(0)
    sr = smooth_image(1)
    assert apply_colour_fix(None, sr, ref) is sr
    assert torch.equal(apply_colour_fix('adain', sr, ref), adain_colour_fix(sr, ref).clamp(0, 1))
    assert torch.equal(apply_colour_fix('wavelet', sr, ref), wavelet_colour_fix(sr, ref).clamp(0, 1))
    bright = torch.ones_like(ref)
    out = apply_colour_fix('wavelet', sr + 0.9, bright)
    assert float(out.max()) <= 1 and float(out.min()) >= 0
    assert check_colour_fix('none') is None and check_colour_fix(None) is None and COLOUR_FIXES == ('wavelet', 'adain')
    with pytest.raises(ValueError, match=mentions('val.colour_fix', 'null', 'wavelet', 'adain', "'gray'")):
        check_colour_fix('gray', 'val.colour_fix')
    with pytest.raises(ValueError, match='same shape'):
        apply_colour_fix('adain', sr, ref[..., :16])


# ----------------------------------------------------------------------------------------------- through the options

def _model(tiny_data, **overrides):
    from basicsr.models import build_model
    opt = tiny_options(tiny_data, yoda=False, **overrides)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {}
    return build_model(opt)


def _batch(tiny_data):
    from basicsr.data import build_dataset
    from torch.utils.data import default_collate
    opt = tiny_options(tiny_data, yoda=False)
    ds = build_dataset(dict(opt['datasets']['val'], phase='val', scale=opt['scale']))
    return default_collate([ds[i] for i in range(2)])


def test_val_colour_fix_reaches_the_pipeline(tiny_data, one_thread):
    """val.colour_fix -> ValOptions -> DiffusionSR: the fixed sample is the fix of the plain sample (same seed)."""
    from yoda_plugin.config import build_pipeline
    torch.manual_seed(0)
    plain = _model(tiny_data)
    batch = _batch(tiny_data)
    plain.feed_data(batch)
    reference = plain.sample(seed=0)
    assert plain.pipeline.colour_fix is None
    for fix in COLOUR_FIXES:
        model = _model(tiny_data, val__colour_fix=fix)
        assert model.val_opt.colour_fix == fix and model.pipeline.colour_fix == fix
        model.net_g_ema.load_state_dict(plain.net_g_ema.state_dict())
        model.feed_data(batch)
        out = model.sample(seed=0)
        assert torch.equal(out, apply_colour_fix(fix, reference, batch['lq_up'])), fix
        assert not torch.equal(out, reference)
    # Tiled sampling: the fix runs once, on the whole image after the tiles.
    opt = tiny_options(tiny_data, yoda=False, val__colour_fix='wavelet')
    net = plain.sampling_net()
    tiled_plain = build_pipeline(net, opt, tiling={'tile_size': 16, 'tile_overlap': 8}, colour_fix='none')
    tiled_fixed = build_pipeline(net, opt, tiling={'tile_size': 16, 'tile_overlap': 8})
    assert tiled_plain.colour_fix is None and tiled_fixed.colour_fix == 'wavelet'
    a, _ = tiled_plain(batch['lq'], batch['lq_up'], None, torch.Generator().manual_seed(1))
    b, info = tiled_fixed(batch['lq'], batch['lq_up'], None, torch.Generator().manual_seed(1))
    assert info['tiles'] > 1 and info['colour_fix'] == 'wavelet'
    assert torch.equal(b, apply_colour_fix('wavelet', a, batch['lq_up']))
    assert build_pipeline(net, tiny_options(tiny_data, yoda=False), colour_fix='adain').colour_fix == 'adain'


def test_unknown_colour_fix_names_the_option(tiny_data):
    from yoda_plugin.config import build_pipeline
    with pytest.raises(ValueError, match=mentions('val.colour_fix', 'null', 'wavelet', 'adain', "'histogram'")):
        _model(tiny_data, val__colour_fix='histogram')
    with pytest.raises(ValueError, match=mentions('val.colour_fix', "'AdaIN'")):
        build_pipeline(_model(tiny_data).sampling_net(), tiny_options(tiny_data, yoda=False), colour_fix='AdaIN')


def test_resolver_and_script_take_the_colour_fix(tiny_data, tmp_path, one_thread):
    from yoda_plugin import YODAResolver
    from yoda_plugin.archs.sr3_unet_arch import SR3UNet
    torch.manual_seed(0)
    net_opt = dict(tiny_options(tiny_data)['network_g'])
    net_opt.pop('type')
    ckpt = str(tmp_path / 'net_g.pth')
    torch.save({'params_ema': SR3UNet(**net_opt).state_dict()}, ckpt)
    opt = tiny_options(tiny_data, yoda=False, val__colour_fix='adain')
    opt['path'] = {'pretrain_network_g': ckpt}
    assert YODAResolver.from_options(opt, device='cpu').pipeline.colour_fix == 'adain'
    assert YODAResolver.from_options(opt, device='cpu', colour_fix='none').pipeline.colour_fix is None
    assert YODAResolver.from_options(opt, device='cpu', colour_fix='wavelet').pipeline.colour_fix == 'wavelet'

    script = load_script('inference_yoda.py', 'inference_yoda_colour_fix')
    opt_file = write_options(tmp_path / 'opt.yml', opt)
    parse = script.build_parser().parse_args
    for flag, expected in (([], 'adain'), (['--colour-fix', 'none'], None), (['--colour-fix', 'wavelet'], 'wavelet')):
        args = parse(['in.png', '-o', str(tmp_path), '--opt', opt_file, '--device', 'cpu', '--tile', '0'] + flag)
        assert script.build_resolver(args, script.common.load_options(opt_file)).pipeline.colour_fix == expected
    with pytest.raises(SystemExit):
        parse(['in.png', '-o', str(tmp_path), '--opt', opt_file, '--colour-fix', 'gray'])
    import cv2
    lr = (smooth_image(3, size=8, batch=1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'lr.png'), lr[:, :, ::-1])
    out = tmp_path / 'out'
    assert script.main([str(tmp_path / 'lr.png'), '-o', str(out), '--opt', opt_file, '--device', 'cpu', '--quiet',
                        '--colour-fix', 'wavelet']) == 0
    assert cv2.imread(str(out / 'lr.png')).shape == (32, 32, 3) and os.path.isfile(out / 'lr.png')
