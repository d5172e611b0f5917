"""Colour shift, LR-PSNR and scikit-image SSIM metrics: hand-made cases, scikit-image equivalence, validation."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_metric
from basicsr.metrics.metric_util import to_y_channel
from basicsr.utils.registry import METRIC_REGISTRY

import yoda_plugin  # noqa: F401  (registers the metrics)
from yoda_plugin.data.transforms import bicubic_resize
from yoda_plugin.metrics.colour_metric import (bgr_to_lab, calculate_colour_shift, calculate_lr_psnr,
                                               calculate_ssim_skimage, ciede2000)

from conftest import mentions, synthetic_image, tiny_options


def structured(seed=0, size=48, low=20, high=230):
    """Gradient + rectangles + mild noise, squeezed into [low, high] so offsets of up to 20 never clip."""
    rng = np.random.default_rng(seed)
    img = synthetic_image(rng, size).astype(np.float64)
    img = img + rng.normal(0, 6, img.shape)
    return np.round(low + np.clip(img, 0, 255) * (high - low) / 255).astype(np.uint8)


def checkerboard(size, amplitude):
    yy, xx = np.mgrid[0:size, 0:size]
    return (amplitude * (1 - 2 * ((yy + xx) % 2)))[:, :, None].astype(np.float64)


# ----------------------------------------------------------------------------------------------- SSIM

@pytest.mark.parametrize('seed,shape', [(0, (40, 33)), (1, (64, 64)), (2, (7, 19))])
def test_ssim_matches_scikit_image(seed, shape):
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape + (3, )).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    for x, y in ((a, b), (b, a), (structured(seed, max(shape))[:shape[0], :shape[1]], a)):
        ours = calculate_ssim_skimage(x, y)
        ref = structural_similarity(x, y, channel_axis=2, data_range=255)
        assert abs(ours - ref) < 1e-6, (ours, ref)
        y_ours = calculate_ssim_skimage(x, y, test_y_channel=True)
        y_ref = structural_similarity(to_y_channel(x)[..., 0].astype(np.float64),
                                      to_y_channel(y)[..., 0].astype(np.float64), data_range=255)
        assert abs(y_ours - y_ref) < 1e-6, (y_ours, y_ref)
    if min(shape) >= 15:
        crop = calculate_ssim_skimage(a, b, crop_border=4, input_order='HWC')
        assert abs(crop - structural_similarity(a[4:-4, 4:-4], b[4:-4, 4:-4], channel_axis=2, data_range=255)) < 1e-6
        chw = calculate_ssim_skimage(a.transpose(2, 0, 1), b.transpose(2, 0, 1), input_order='CHW')
        assert chw == calculate_ssim_skimage(a, b)
        wide = calculate_ssim_skimage(a, b, win_size=11, use_sample_covariance=False)
        assert abs(wide - structural_similarity(a, b, channel_axis=2, data_range=255, win_size=11,
                                                use_sample_covariance=False)) < 1e-6


def test_ssim_of_a_pure_offset_is_the_luminance_term():
    """Constant images: no variance, so SSIM = (2 m (m + d) + C1) / (m^2 + (m + d)^2 + C1), by hand."""
    m, d, c1 = 100.0, 20.0, (0.01 * 255)**2
    flat = np.full((16, 16, 3), m, np.uint8)
    expected = (2 * m * (m + d) + c1) / (m**2 + (m + d)**2 + c1)
    assert abs(calculate_ssim_skimage(flat + np.uint8(d), flat) - expected) < 1e-12
    img = structured()
    assert calculate_ssim_skimage(img, img) == 1.0
    # An offset keeps the structure (contrast-structure term 1): SSIM stays far above that of noise of equal MSE.
    noisy = np.clip(img + np.random.default_rng(0).choice([-10.0, 10.0], img.shape), 0, 255).astype(np.uint8)
    assert calculate_ssim_skimage(img + np.uint8(10), img) > 0.99 > calculate_ssim_skimage(noisy, img)


def test_ssim_errors():
    img = structured()
    with pytest.raises(ValueError, match=mentions('6x48', '7x7')):
        calculate_ssim_skimage(img[:6], img[:6])
    with pytest.raises(ValueError, match=mentions('(48, 48, 3)', '(47, 48, 3)')):
        calculate_ssim_skimage(img, img[:-1])
    with pytest.raises(ValueError, match=mentions('win_size', 'odd', 'got 8')):
        calculate_ssim_skimage(img, img, win_size=8)
    with pytest.raises(TypeError, match=mentions("['gaussian_weights']")):
        calculate_ssim_skimage(img, img, gaussian_weights=True)


# ----------------------------------------------------------------------------------------------- colour shift

def test_ciede2000_published_pairs():
    """Pairs of Sharma, Wu, Dalal (2005), Table 1 (to their 4 decimals), including the hue wrap-around."""
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, -1, 2), (50, 0, 0), 2.3669), ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
             ((50, 2.5, 0), (73, 25, -18), 27.1492),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644)]
    got = ciede2000(np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float))
    assert np.allclose(got, [p[2] for p in pairs], atol=5e-5), got


def test_lab_and_ciede2000_match_scikit_image():
    from skimage.color import deltaE_ciede2000, rgb2lab
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (2, 30, 20, 3)).astype(np.uint8)
    # scikit-image rounds the CIE constants (0.008856, 7.787): 1e-3 in L*a*b* near black, less elsewhere.
    assert np.abs(bgr_to_lab(a) - rgb2lab(a[..., ::-1])).max() < 1e-3
    ref = deltaE_ciede2000(rgb2lab(a[..., ::-1]), rgb2lab(b[..., ::-1]))
    assert np.abs(ciede2000(bgr_to_lab(a), bgr_to_lab(b)) - ref).max() < 1e-3


def test_identical_images_have_no_colour_shift():
    img = structured()
    for measure in ('ciede2000', 'mean_abs', 'channel_mean'):
        assert calculate_colour_shift(img, img, measure=measure) == 0.0
        assert calculate_colour_shift(img, img, measure=measure, sigma=0, crop_border=4) == 0.0


def test_pure_colour_offset_gives_the_offset():
    """HR + (dB, dG, dR) = (6, -3, 9): mean_abs = channel_mean = 6 (no clipping, a linear low-pass)."""
    hr = structured()
    offset = np.array([6, -3, 9], np.float64)
    sr = (hr + offset).astype(np.uint8)
    for measure in ('mean_abs', 'channel_mean'):
        for sigma in (0, 2, 4.0):
            assert abs(calculate_colour_shift(sr, hr, measure=measure, sigma=sigma) - 6.0) < 1e-9
    assert abs(calculate_colour_shift(sr, hr, measure='mean_abs', crop_border=8) - 6.0) < 1e-9
    # Uniform images: the mean CIEDE2000 is that of the two colours (scikit-image's Lab and Delta E 2000).
    from skimage.color import deltaE_ciede2000, rgb2lab
    c1, c2 = np.array([[[60, 120, 180]]], np.uint8), np.array([[[66, 117, 189]]], np.uint8)  # BGR
    expected = float(deltaE_ciede2000(rgb2lab(c1[..., ::-1]), rgb2lab(c2[..., ::-1]))[0, 0])
    flat1, flat2 = np.tile(c1, (24, 24, 1)), np.tile(c2, (24, 24, 1))
    assert abs(calculate_colour_shift(flat2, flat1) - expected) < 1e-3 and expected > 1
    assert calculate_colour_shift(sr, hr) > 1.0  # the structured image's shift is visible too


def test_colour_shift_ignores_fine_structure():
    """A +-20 checkerboard (the LR's Nyquist and above) ruins PSNR but is no colour shift; an offset of 3 is."""
    from basicsr.metrics import calculate_psnr
    hr = structured()
    textured = (hr + checkerboard(hr.shape[0], 20)).astype(np.uint8)
    tinted = (hr + np.array([3, 3, 3], np.float64)).astype(np.uint8)
    assert calculate_psnr(textured, hr, 0) < calculate_psnr(tinted, hr, 0) - 15
    for measure in ('mean_abs', 'ciede2000'):
        assert calculate_colour_shift(textured, hr, measure=measure) < 0.05
    assert calculate_colour_shift(textured, hr, measure='mean_abs', sigma=0) == pytest.approx(20.0)
    assert calculate_colour_shift(tinted, hr, measure='mean_abs') == pytest.approx(3.0)


def test_colour_shift_errors_and_registry():
    img = structured()
    with pytest.raises(ValueError, match=mentions('measure', "'deltaE'")):
        calculate_colour_shift(img, img, measure='deltaE')
    with pytest.raises(ValueError, match=mentions('sigma', '>= 0', 'got -1')):
        calculate_colour_shift(img, img, sigma=-1)
    with pytest.raises(ValueError, match='3-channel BGR'):
        calculate_colour_shift(img[..., :1], img[..., :1])
    with pytest.raises(ValueError, match=mentions('test_y_channel: true')):
        calculate_colour_shift(img, img, test_y_channel=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sigam'\]"):
        calculate_colour_shift(img, img, sigam=2)
    sr = (img + np.array([6, -3, 9], np.float64)).astype(np.uint8)
    for name in ('calculate_colour_shift', 'calculate_lr_psnr', 'calculate_ssim_skimage'):
        assert name in METRIC_REGISTRY
    opt = {'type': 'calculate_colour_shift', 'measure': 'mean_abs', 'sigma': 4, 'crop_border': 0,
           'test_y_channel': False}
    assert abs(calculate_metric({'img': sr, 'img2': img}, opt) - 6.0) < 1e-9


# ----------------------------------------------------------------------------------------------- LR-PSNR

@pytest.mark.parametrize('resize', ['pil', 'matlab'])
def test_lr_psnr_of_an_exact_pair(resize):
    hr = structured(size=32)
    lq = bicubic_resize(hr, (8, 8), resize)
    assert calculate_lr_psnr(hr, hr, lq=lq, resize=resize) == float('inf')  # the LR is the SR downsampled
    assert calculate_lr_psnr(hr, lq=lq, scale=4, resize=resize) == float('inf')
    # The LR off by 3 in every channel: MSE 9, PSNR 20 log10(255 / 3); on Y the offset is 3 * 219 / 255.
    shifted = lq + np.uint8(3)
    assert calculate_lr_psnr(hr, lq=shifted, resize=resize) == pytest.approx(20 * math.log10(255 / 3), abs=1e-9)
    y_offset = 3 * (24.966 + 128.553 + 65.481) / 255
    assert calculate_lr_psnr(hr, lq=shifted, resize=resize, test_y_channel=True) == pytest.approx(
        20 * math.log10(255 / y_offset), abs=1e-4)
    assert calculate_lr_psnr(hr, lq=shifted, resize=resize, crop_border=2) == pytest.approx(
        20 * math.log10(255 / 3), abs=1e-9)


def test_lr_psnr_sees_colour_and_the_resize_mode():
    hr = structured(size=32)
    lq = bicubic_resize(hr, (8, 8), 'pil')
    tinted = (hr + np.array([10, 10, 10], np.float64)).astype(np.uint8)
    assert calculate_lr_psnr(tinted, lq=lq) == pytest.approx(20 * math.log10(255 / 10), abs=0.2)
    other = calculate_lr_psnr(hr, lq=lq, resize='matlab')  # the wrong downsampling for this LR
    assert 30 < other < float('inf')


def test_lr_psnr_errors():
    hr = structured(size=32)
    lq = bicubic_resize(hr, (8, 8), 'pil')
    with pytest.raises(ValueError, match=mentions('calculate_lr_psnr', 'lq')):
        calculate_lr_psnr(hr, hr)
    with pytest.raises(ValueError, match=mentions('(30, 32)', '(8, 8)')):
        calculate_lr_psnr(hr[:30], lq=lq)
    with pytest.raises(ValueError, match=mentions('(32, 32)', '(8, 8)', 'scale 2')):
        calculate_lr_psnr(hr, lq=lq, scale=2)
    with pytest.raises(ValueError, match=mentions('resize', "'bilinear'")):
        calculate_lr_psnr(hr, lq=lq, resize='bilinear')
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scael'\]"):
        calculate_lr_psnr(hr, lq=lq, scael=4)


# ----------------------------------------------------------------------------------------------- validation

def test_validation_passes_lq_only_to_metrics_that_take_it():
    from yoda_plugin.models.validation import metric_takes_lq
    assert metric_takes_lq({'type': 'calculate_lr_psnr'})
    for name in ('calculate_psnr', 'calculate_ssim', 'calculate_lpips', 'calculate_ssim_skimage',
                 'calculate_colour_shift', 'no_such_metric'):
        assert not metric_takes_lq({'type': name}), name


def test_validation_reports_the_new_metrics(tiny_data, tmp_path, one_thread):
    """A tiny SR3 model validated with the three metrics: each row equals the metric of the same seeded sample."""
    import csv

    from basicsr.data import build_dataset
    from basicsr.models import build_model
    from basicsr.utils import tensor2img
    from torch.utils.data import default_collate
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0},
               'lr_psnr': {'type': 'calculate_lr_psnr', 'resize': 'pil'},
               'colour': {'type': 'calculate_colour_shift'},
               'ssim_sk': {'type': 'calculate_ssim_skimage', 'crop_border': 0}}
    opt = tiny_options(tiny_data, yoda=False, val__metrics=metrics, val__save_img=False)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {'results_root': str(tmp_path), 'log': str(tmp_path), 'visualization': str(tmp_path / 'vis')}
    torch.manual_seed(0)
    model = build_model(opt)
    dataset = build_dataset(dict(opt['datasets']['val'], phase='val', scale=opt['scale']))
    model.nondist_validation(SimpleNamespace(dataset=dataset), 0, None, False)
    with open(tmp_path / 'metrics_tiny_val.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(dataset) == 2
    for idx, row in enumerate(rows):
        model.feed_data(default_collate([dataset[idx]]))
        model.test(seed=idx)  # val.sample_seed 0 + index
        sr, hr, lq = (tensor2img([t.cpu()]) for t in (model.output, model.gt, model.lq))
        assert float(row['lr_psnr']) == pytest.approx(calculate_lr_psnr(sr, hr, lq=lq), rel=1e-9)
        assert float(row['colour']) == pytest.approx(calculate_colour_shift(sr, hr), rel=1e-9)
        assert float(row['ssim_sk']) == pytest.approx(calculate_ssim_skimage(sr, hr), rel=1e-9)
        assert float(row['colour']) > 0 and -1 < float(row['ssim_sk']) < 1 and 0 < float(row['lr_psnr']) < 60
