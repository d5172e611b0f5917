"""Colour shift, LR consistency and scikit-image's SSIM as BasicSR metrics.

Three metrics for ``val.metrics`` (all take BasicSR's images: ``tensor2img``
output, uint8 or float in [0, 255], HWC, **BGR**; ``img`` is the SR, ``img2``
the HR):

``calculate_colour_shift`` (lower is better, 0 for identical images)
    The colour difference of the *low-passed* SR and HR: both are blurred
    with a Gaussian of standard deviation ``sigma`` HR pixels (default 4,
    OpenCV's kernel of radius 4 sigma, mirrored borders), which removes the
    detail a diffusion model invents or misses and keeps the colour of every region;
    then, per ``measure``:

    * ``ciede2000`` (default): the mean over pixels of the CIEDE2000 colour
      difference (Sharma, Wu, Dalal 2005; kL = kC = kH = 1) in CIELAB (sRGB,
      D65). About 1 is barely visible, 2-3 a clearly visible tint.
    * ``mean_abs``: the mean over pixels and channels of |low(SR) - low(HR)|
      in 0-255 units. A pure offset (dB, dG, dR) gives (|dB| + |dG| + |dR|) / 3.
    * ``channel_mean``: the mean over channels of |mean(SR_c) - mean(HR_c)| in
      0-255 units (global tint only; ``sigma`` plays no role).

    A pure colour offset with no clipping gives exactly the offset in
    ``mean_abs`` / ``channel_mean``, while fine detail hardly counts: a +-20
    checkerboard on the HR (period 2 pixels) reads below 0.05 in both
    ``mean_abs`` and ``ciede2000`` (tests/test_colour_metric.py).

``calculate_lr_psnr`` (higher is better)
    LR consistency: the PSNR between the SR downsampled by ``scale`` and the
    LR input ``lq``, as SRFlow and SRDiff report it ("LR-PSNR"). The SR is
    downsampled with the datasets' own bicubic (:func:`yoda_plugin.data.transforms.bicubic_resize`):
    ``resize: pil`` (default; Pillow's antialiased bicubic, what our datasets
    use by default to make LR from HR) or ``resize: matlab`` (MATLAB-compatible
    ``imresize``, what SRDiff / SRFlow use). Use the ``resize`` of the dataset
    so an SR equal to the HR scores inf when the LR was made from the HR.
    ``scale`` defaults to the size ratio of SR and LR. Our validation passes
    ``lq`` to every metric whose function declares an ``lq`` parameter.
    ``crop_border`` counts LR pixels.

``calculate_ssim_skimage`` (higher is better)
    SSIM with scikit-image's ``structural_similarity`` semantics, the
    evaluation SRDiff and SRFlow use (``structural_similarity(sr, hr,
    multichannel=True, data_range=255)``): a 7x7 uniform window, sample
    covariance (N / (N - 1)), K1 = 0.01, K2 = 0.03, data range 255, the SSIM
    map averaged without its 3-pixel border ("valid" windows only), per
    channel, then averaged over channels. BasicSR's ``calculate_ssim`` uses an
    11x11 Gaussian window and reads 0.003-0.023 lower on bicubic 4x output.
    ``test_y_channel: true`` works on BasicSR's Y channel (BT.601, float, not
    rounded). Our own NumPy implementation: scikit-image is no runtime dependency.

Usage in an option file::

    val:
      metrics:
        colour_shift: {type: calculate_colour_shift}                     # CIEDE2000, sigma 4
        colour_shift_rgb: {type: calculate_colour_shift, measure: mean_abs, sigma: 4}
        lr_psnr: {type: calculate_lr_psnr, resize: pil}                  # the dataset's resize
        ssim_skimage: {type: calculate_ssim_skimage, crop_border: 0, test_y_channel: false}
"""
import math
from typing import Optional

import cv2
import numpy as np
from basicsr.metrics.metric_util import reorder_image, to_y_channel
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.utils.registry import METRIC_REGISTRY

COLOUR_SHIFT_MEASURES = ('ciede2000', 'mean_abs', 'channel_mean')
DEFAULT_SIGMA = 4.0

# sRGB (IEC 61966-2-1) primaries with the D65 white: linear RGB -> CIE XYZ, and the D65 white point (2 degrees).
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


# ----------------------------------------------------------------------------------------------- helpers

def _image(img, input_order: str, name: str, metric: str) -> np.ndarray:
    """BasicSR's image as float64 (H, W, C) in [0, 255]."""
    if img is None:
        raise ValueError(f'{metric}: {name} is missing (BasicSR passes the SR as img and the HR as img2)')
    arr = np.asarray(img)
    if arr.ndim not in (2, 3):
        raise ValueError(f'{metric}: {name} must be an (H, W[, C]) image, got shape {arr.shape}')
    return reorder_image(arr, input_order=input_order).astype(np.float64)


def _border(value, metric: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f'{metric}: crop_border must be an integer >= 0, got {value!r}')
    return int(value)


def _crop(img: np.ndarray, border: int, metric: str) -> np.ndarray:
    if not border:
        return img
    if 2 * border >= min(img.shape[:2]):
        raise ValueError(f'{metric}: crop_border {border} leaves nothing of a {img.shape[0]}x{img.shape[1]} image')
    return img[border:-border, border:-border]


def _same_shape(a: np.ndarray, b: np.ndarray, metric: str):
    if a.shape != b.shape:
        raise ValueError(f'{metric}: image shapes are different: {a.shape} and {b.shape}')


def _no_unknown(kwargs: dict, metric: str, known: str, ignored=('lq', )):
    unknown = sorted(set(kwargs) - set(ignored))
    if unknown:
        raise TypeError(f'{metric} got unknown option(s) {unknown}; known: {known}')


def _three_channels(img: np.ndarray, name: str, metric: str):
    if img.shape[2] != 3:
        raise ValueError(f'{metric} needs 3-channel BGR images, {name} has {img.shape[2]} channel(s)')


# ----------------------------------------------------------------------------------------------- colour

def bgr_to_lab(img: np.ndarray) -> np.ndarray:
    """BGR in [0, 255] (H, W, 3) -> CIELAB (L in [0, 100]), sRGB with the D65 white, float64."""
    rgb = np.clip(np.asarray(img, dtype=np.float64)[..., ::-1] / 255.0, 0.0, 1.0)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055)**2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of two CIELAB arrays (..., 3), element-wise (Sharma, Wu, Dalal 2005, Eq. 1-22)."""
    lab1, lab2 = np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64)
    L1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    L2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    pow25_7 = 25.0**7
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + pow25_7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.mod(np.arctan2(b1, a1p), 2 * np.pi)  # atan2(0, 0) = 0: the hue of a neutral colour
    h2p = np.mod(np.arctan2(b2, a2p), 2 * np.pi)
    chroma_both = c1p * c2p
    neutral = chroma_both == 0

    dL = L2 - L1
    dC = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > np.pi, dh - 2 * np.pi, np.where(dh < -np.pi, dh + 2 * np.pi, dh))
    dh = np.where(neutral, 0.0, dh)
    dH = 2 * np.sqrt(chroma_both) * np.sin(dh / 2)

    L_mean = (L1 + L2) / 2
    cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    far = np.abs(h1p - h2p) > np.pi
    h_mean = np.where(far, np.where(h_sum < 2 * np.pi, h_sum + 2 * np.pi, h_sum - 2 * np.pi), h_sum) / 2
    h_mean = np.where(neutral, h_sum, h_mean)

    deg = np.pi / 180
    t = (1 - 0.17 * np.cos(h_mean - 30 * deg) + 0.24 * np.cos(2 * h_mean) + 0.32 * np.cos(3 * h_mean + 6 * deg)
         - 0.20 * np.cos(4 * h_mean - 63 * deg))
    d_theta = 30 * deg * np.exp(-((h_mean / deg - 275) / 25)**2)
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + pow25_7))
    s_l = 1 + 0.015 * (L_mean - 50)**2 / np.sqrt(20 + (L_mean - 50)**2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_t = -np.sin(2 * d_theta) * r_c
    tl, tc, th = dL / s_l, dC / s_c, dH / s_h
    return np.sqrt(np.maximum(tl**2 + tc**2 + th**2 + r_t * tc * th, 0.0))


def gaussian_low_pass(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, C) float64 image, std ``sigma`` pixels (OpenCV: radius 4 sigma), mirrored borders."""
    if sigma == 0:
        return img
    out = cv2.GaussianBlur(np.ascontiguousarray(img, dtype=np.float64), (0, 0), sigmaX=sigma, sigmaY=sigma,
                           borderType=cv2.BORDER_REFLECT)
    return out.reshape(img.shape)


@METRIC_REGISTRY.register()
def calculate_colour_shift(img, img2, crop_border=0, input_order='HWC', sigma=DEFAULT_SIGMA, measure='ciede2000',
                           **kwargs):
    """Colour shift between the low-passed SR ``img`` and HR ``img2`` (BGR, [0, 255]); lower is better.

    Args:
        crop_border: HR pixels cut off each border after the low-pass (so the blur sees the whole image).
        sigma: std of the Gaussian low-pass in HR pixels (default 4; 0: no low-pass). Scale it with the SR
            factor to keep only colour (e.g. 8 for 8x).
        measure: ``ciede2000`` (mean CIEDE2000 in CIELAB), ``mean_abs`` (mean |difference| over pixels and
            channels, 0-255 units) or ``channel_mean`` (mean over channels of |channel-mean difference|).
    See the module docstring for the definitions.
    """
    name = 'calculate_colour_shift'
    if kwargs.get('test_y_channel'):
        raise ValueError(f'{name} compares colours; test_y_channel: true is not supported')
    kwargs.pop('test_y_channel', None)
    _no_unknown(kwargs, name, 'crop_border, input_order, sigma, measure')
    if measure not in COLOUR_SHIFT_MEASURES:
        raise ValueError(f'{name}: measure must be one of {COLOUR_SHIFT_MEASURES}, got {measure!r}')
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f'{name}: sigma must be a number >= 0 (HR pixels), got {sigma!r}')
    border = _border(crop_border, name)
    sr, hr = _image(img, input_order, 'img', name), _image(img2, input_order, 'img2', name)
    _same_shape(sr, hr, name)
    _three_channels(sr, 'img', name)
    if measure == 'channel_mean':
        sr, hr = _crop(sr, border, name), _crop(hr, border, name)
        return float(np.mean(np.abs(sr.mean(axis=(0, 1)) - hr.mean(axis=(0, 1)))))
    low_sr = _crop(gaussian_low_pass(sr, float(sigma)), border, name)
    low_hr = _crop(gaussian_low_pass(hr, float(sigma)), border, name)
    if measure == 'mean_abs':
        return float(np.mean(np.abs(low_sr - low_hr)))
    return float(np.mean(ciede2000(bgr_to_lab(low_sr), bgr_to_lab(low_hr))))


# ----------------------------------------------------------------------------------------------- LR consistency

def _as_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 255] float -> uint8 (rounded, clipped): the datasets' resize works on uint8 images."""
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def downsample_like_dataset(img: np.ndarray, scale: int, resize: str = 'pil') -> np.ndarray:
    """An HR image (H, W, C) in [0, 255] downsampled by ``scale`` as the datasets make LR images (uint8 out)."""
    from yoda_plugin.data.transforms import bicubic_resize
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f'image size {h}x{w} is not a multiple of the scale {scale}')
    u8 = _as_uint8(img)
    if u8.shape[2] == 1:  # Pillow and imresize want colour: resize a gray image as three equal channels
        return bicubic_resize(np.repeat(u8, 3, axis=2), (h // scale, w // scale), resize)[..., :1]
    return bicubic_resize(u8, (h // scale, w // scale), resize)


@METRIC_REGISTRY.register()
def calculate_lr_psnr(img, img2=None, lq=None, scale: Optional[int] = None, resize='pil', crop_border=0,
                      input_order='HWC', test_y_channel=False, **kwargs):
    """PSNR between the SR ``img`` downsampled by ``scale`` and the LR input ``lq`` (BGR, [0, 255]).

    Args:
        img2: the HR image BasicSR passes; not used.
        lq: the LR input (our validation passes it; BasicSR's own does not).
        scale: the SR factor (default: SR size / LR size, which must be a whole number on both axes).
        resize: the bicubic of the datasets, ``pil`` (default) or ``matlab`` (SRDiff / SRFlow's LR-PSNR).
        crop_border: LR pixels cut off each border before comparing.
        test_y_channel: compare BasicSR's Y channel (BT.601) instead of BGR.
    """
    from yoda_plugin.data.transforms import RESIZE_MODES
    name = 'calculate_lr_psnr'
    _no_unknown(kwargs, name, 'lq, scale, resize, crop_border, input_order, test_y_channel', ignored=())
    if lq is None:
        raise ValueError(f'{name} needs the LR image lq: our validation passes it when the model has an LR input; '
                         'called directly, pass lq=<the LR image, BGR HWC in [0, 255]>')
    if resize not in RESIZE_MODES:
        raise ValueError(f'{name}: resize must be one of {RESIZE_MODES} (the dataset\'s resize), got {resize!r}')
    border = _border(crop_border, name)
    sr, lr = _image(img, input_order, 'img', name), _image(lq, input_order, 'lq', name)
    if sr.shape[2] != lr.shape[2]:
        raise ValueError(f'{name}: img has {sr.shape[2]} channel(s), lq {lr.shape[2]}')
    if scale is None:
        ratio_h, ratio_w = sr.shape[0] / lr.shape[0], sr.shape[1] / lr.shape[1]
        if ratio_h != ratio_w or ratio_h != int(ratio_h):
            raise ValueError(f'{name}: SR size {sr.shape[:2]} is no whole multiple of the LR size {lr.shape[:2]}; '
                             'pass scale')
        scale = int(ratio_h)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f'{name}: scale must be a positive integer, got {scale!r}')
    if sr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(f'{name}: SR size {sr.shape[:2]} is not the LR size {lr.shape[:2]} x scale {scale}')
    down = downsample_like_dataset(sr, int(scale), resize).astype(np.float64)
    _crop(lr, border, name)  # a crop that leaves nothing is an error, not NaN
    return float(calculate_psnr(down, lr, border, test_y_channel=bool(test_y_channel)))


# ----------------------------------------------------------------------------------------------- SSIM

def _box_mean_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size x size window lying wholly inside ``x`` (H, W): (H - size + 1, W - size + 1)."""
    pad = size // 2
    return cv2.boxFilter(x, cv2.CV_64F, (size, size), normalize=True)[pad:x.shape[0] - pad, pad:x.shape[1] - pad]


def ssim_uniform(x: np.ndarray, y: np.ndarray, win_size: int = 7, data_range: float = 255.0,
                 use_sample_covariance: bool = True, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of two 2-D float64 images with a ``win_size`` uniform window, over the windows inside the image.

    scikit-image filters the whole image (mirrored borders) and then drops a
    ``(win_size - 1) // 2`` strip around the SSIM map: exactly the windows that
    lie inside the image, which is what this computes.
    """
    n = win_size * win_size
    cov_norm = n / (n - 1) if use_sample_covariance else 1.0
    ux, uy = _box_mean_valid(x, win_size), _box_mean_valid(y, win_size)
    vx = cov_norm * (_box_mean_valid(x * x, win_size) - ux * ux)
    vy = cov_norm * (_box_mean_valid(y * y, win_size) - uy * uy)
    vxy = cov_norm * (_box_mean_valid(x * y, win_size) - ux * uy)
    c1, c2 = (k1 * data_range)**2, (k2 * data_range)**2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(ssim_map.mean(dtype=np.float64))


@METRIC_REGISTRY.register()
def calculate_ssim_skimage(img, img2, crop_border=0, input_order='HWC', test_y_channel=False, win_size=7,
                           data_range=255.0, use_sample_covariance=True, **kwargs):
    """SSIM as scikit-image's ``structural_similarity`` computes it (SRDiff / SRFlow's evaluation); see the module
    docstring. ``crop_border`` pixels are cut off each border first (BasicSR's convention)."""
    name = 'calculate_ssim_skimage'
    _no_unknown(kwargs, name, 'crop_border, input_order, test_y_channel, win_size, data_range, '
                'use_sample_covariance')
    if isinstance(win_size, bool) or not isinstance(win_size, (int, np.integer)) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f'{name}: win_size must be an odd integer >= 3, got {win_size!r}')
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f'{name}: data_range must be a positive number, got {data_range!r}')
    border = _border(crop_border, name)
    x, y = _image(img, input_order, 'img', name), _image(img2, input_order, 'img2', name)
    _same_shape(x, y, name)
    x, y = _crop(x, border, name), _crop(y, border, name)
    if test_y_channel:
        x, y = to_y_channel(x).astype(np.float64), to_y_channel(y).astype(np.float64)
    if min(x.shape[:2]) < win_size:
        raise ValueError(f'{name}: the image ({x.shape[0]}x{x.shape[1]} after cropping) is smaller than the '
                         f'{win_size}x{win_size} window')
    return float(np.mean([ssim_uniform(x[..., c], y[..., c], int(win_size), float(data_range),
                                       bool(use_sample_covariance)) for c in range(x.shape[2])]))
