"""Masked noise-prediction loss (paper Eq. 10).

    L = E || M(t) * (eps - f(x, z_t, gamma_t)) ||_1

``normalization='all'`` divides by the number of elements (the literal Eq. 10
up to a constant; a sample whose mask is small contributes little), so with a
mask of ones it equals the vanilla mean L1 loss of Eq. 8 exactly.
``normalization='masked'`` divides by the number of masked elements instead,
so every sample weighs the same whatever its mask covers.
"""
from typing import Optional

import torch

LOSS_TYPES = ('l1', 'l2')
NORMALIZATIONS = ('all', 'masked')


def masked_noise_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      loss_type: str = 'l1', normalization: str = 'all') -> torch.Tensor:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
    if pred.shape != target.shape:
        raise ValueError(f'prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}')
    diff = pred - target
    err = diff.abs() if loss_type == 'l1' else diff * diff
    if mask is None:
        return err.mean()
    if mask.dim() != err.dim() or mask.shape[0] != err.shape[0] or mask.shape[2:] != err.shape[2:]:
        raise ValueError(f'mask shape {tuple(mask.shape)} does not broadcast to {tuple(err.shape)}')
    err = err * mask
    if normalization == 'all':
        return err.mean()
    count = mask.expand_as(err).sum().clamp(min=1.0)
    return err.sum() / count
