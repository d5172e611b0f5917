"""Opt-in colour correction of sampled SR images against the upsampled LR (plain PyTorch).

Diffusion SR models trained with small batches drift in colour (the paper's
Table 2 / Fig. 7 for vanilla SR3); peers correct it after sampling. Two fixes,
both on images in [0, 1], (B, C, H, W), with the bicubic-upsampled LR as the
reference (it has the right colours, only no detail):

* ``adain``: every channel of every image gets the reference's mean and
  standard deviation (AdaIN, Huang & Belongie 2017): ``(sr - mean_sr) / std_sr
  * std_ref + mean_ref``. Channel means then equal the reference's exactly.
* ``wavelet``: the SR's low-frequency band is replaced by the reference's
  (the idea of StableSR's wavelet colour fix): ``sr - low(sr) + low(ref)``.
  ``low`` is an a-trous ("with holes") cascade of ``levels`` separable
  [1, 2, 1] / 4 binomial blurs with dilations 1, 2, 4, ...: five levels (the
  default) leave a low band of about 13 pixels standard deviation, well below
  the LR's Nyquist frequency at 4x and 8x, so the SR's detail is kept and
  only its colour layout comes from the LR. Borders are mirrored.

:func:`apply_colour_fix` dispatches by name and clips to [0, 1]. The pipeline
(:class:`~yoda_plugin.core.pipeline.DiffusionSR`, ``colour_fix=``) applies it
once to the whole sampled image (after tiling), so the option is
``val.colour_fix`` for the BasicSR models and ``colour_fix=`` / ``--colour-fix``
for ``YODAResolver`` and ``scripts/inference_yoda.py``.
"""
from typing import Optional

import torch
import torch.nn.functional as F

COLOUR_FIXES = ('wavelet', 'adain')
DEFAULT_WAVELET_LEVELS = 5


def check_colour_fix(value, where: str = 'colour_fix') -> Optional[str]:
    """The colour fix name of an option value: None (also ``none`` / false) or one of :data:`COLOUR_FIXES`."""
    if value is None or value is False or value == 'none':
        return None
    if isinstance(value, str) and value in COLOUR_FIXES:
        return value
    raise ValueError(f'{where} must be null (no colour fix), wavelet or adain, got {value!r}')


def _check_pair(image: torch.Tensor, reference: torch.Tensor, what: str):
    if image.dim() != 4 or image.shape != reference.shape:
        raise ValueError(f'{what} needs an image and a reference of the same shape (B, C, H, W), got '
                         f'{tuple(image.shape)} and {tuple(reference.shape)}')


def adain_colour_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel, the mean and (population) std of ``reference`` on ``image``; not clipped.

    A flat channel (std below ``eps``) takes the reference's mean and keeps no contrast of its own to scale.
    """
    _check_pair(image, reference, 'adain_colour_fix')
    x, ref = image.float(), reference.float().to(image.device)
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)
    ref_mean, ref_std = ref.mean(dim=(2, 3), keepdim=True), ref.std(dim=(2, 3), keepdim=True, unbiased=False)
    flat = std < eps  # rounding noise of a flat channel must not be blown up to the reference's contrast
    normalised = torch.where(flat, torch.zeros_like(x), (x - mean) / std.clamp_min(eps))
    return (normalised * ref_std + ref_mean).to(image.dtype)


def _blur_binomial(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Separable [1, 2, 1] / 4 blur with taps ``dilation`` apart, mirrored borders (edge-replicated when too small)."""
    h, w = x.shape[-2:]
    d = dilation
    mode = 'reflect' if d < h and d < w else 'replicate'
    p = F.pad(x, (d, d, 0, 0), mode=mode)
    x = (p[..., :, :w] + 2 * p[..., :, d:d + w] + p[..., :, 2 * d:2 * d + w]) / 4
    p = F.pad(x, (0, 0, d, d), mode=mode)
    return (p[..., :h, :] + 2 * p[..., d:d + h, :] + p[..., 2 * d:2 * d + h, :]) / 4


def low_frequency(image: torch.Tensor, levels: int = DEFAULT_WAVELET_LEVELS) -> torch.Tensor:
    """The coarsest band of an a-trous decomposition: ``levels`` binomial blurs with dilations 1, 2, ..., 2^(levels-1).

    ``image - low_frequency(image)`` is the sum of the ``levels`` detail bands (what the wavelet fix keeps).
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f'levels must be a positive integer, got {levels!r}')
    x = image.float()
    for level in range(levels):
        x = _blur_binomial(x, 2**level)
    return x


def wavelet_colour_fix(image: torch.Tensor, reference: torch.Tensor,
                       levels: int = DEFAULT_WAVELET_LEVELS) -> torch.Tensor:
    """``image``'s detail bands on ``reference``'s low band: ``image - low(image) + low(reference)``; not clipped."""
    _check_pair(image, reference, 'wavelet_colour_fix')
    x, ref = image.float(), reference.float().to(image.device)
    return (x - low_frequency(x, levels) + low_frequency(ref, levels)).to(image.dtype)


def apply_colour_fix(name: Optional[str], image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``image`` corrected by the fix ``name`` (None: unchanged) against ``reference``, clipped to [0, 1]."""
    name = check_colour_fix(name)
    if name is None:
        return image
    fixed = adain_colour_fix(image, reference) if name == 'adain' else wavelet_colour_fix(image, reference)
    return fixed.clamp(0, 1)


__all__ = ['COLOUR_FIXES', 'check_colour_fix', 'adain_colour_fix', 'wavelet_colour_fix', 'low_frequency',
           'apply_colour_fix']
