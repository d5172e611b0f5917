"""Time-dependent masks (paper Eq. 9).

    M(t)_ij = 1  if  T * (A_ij + l) >= t,  else 0

A is the attention map in [0, 1], l in (0, 1) the lower bound and T the number
of *training* time steps. Pixel (i, j) is refined at the last
min(T, floor(T * (A_ij + l))) time steps, so every pixel gets at least
floor(T * l) steps and a pixel is never switched off once switched on
(sampling runs t = T..1). On a respaced sampling grid we keep the same rule
with t the training time step of each sampling step, i.e. the mask is defined
on normalised time t / T: the share of sampling steps a pixel is refined at is
the same on both grids.
"""
import numbers
from typing import Union

import torch

Number = Union[int, float]


def check_lower_bound(lower_bound: Number, name: str = 'yoda.lower_bound') -> float:
    """Return l as float; raise ValueError unless 0 < l < 1 (paper Sec. 3.1)."""
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real):
        raise ValueError(f'{name} must be a number in (0, 1), got {lower_bound!r}')
    value = float(lower_bound)
    if not 0.0 < value < 1.0:
        raise ValueError(f'{name} must lie in the open interval (0, 1) (paper Eq. 9), got {value}')
    return value


def check_attention(attention: torch.Tensor, name: str = 'attention') -> torch.Tensor:
    """Validate an attention map batch and return it as (B, 1, H, W).

    Accepts (H, W), (B, H, W) or (B, 1, H, W); values must be finite and in [0, 1].
    """
    if not isinstance(attention, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(attention).__name__}')
    if not attention.is_floating_point():
        raise TypeError(f'{name} must be a floating point tensor with values in [0, 1], got dtype {attention.dtype}')
    if attention.dim() == 2:
        attention = attention[None, None]
    elif attention.dim() == 3:
        attention = attention[:, None]
    elif attention.dim() != 4 or attention.shape[1] != 1:
        raise ValueError(f'{name} must have shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(attention.shape)}')
    if attention.numel() == 0:
        raise ValueError(f'{name} is empty: shape {tuple(attention.shape)}')
    # One fused check on the hot path (NaN fails both comparisons); details only on failure.
    if not bool(((attention >= 0) & (attention <= 1)).all()):
        if not bool(torch.isfinite(attention).all()):
            raise ValueError(f'{name} contains NaN or Inf values; attention maps must be finite and in [0, 1]')
        lo, hi = float(attention.min()), float(attention.max())
        raise ValueError(f'{name} values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}')
    return attention


def time_dependent_mask(attention: torch.Tensor, lower_bound: Number, t: Union[int, torch.Tensor],
                        num_timesteps: int) -> torch.Tensor:
    """Eq. 9 for a batch: a {0, 1} mask shaped like ``attention`` (B, 1, H, W).

    ``t`` is the training time step (1..T), a python int or a tensor of shape
    (B,) (one time step per sample, as in training). Comparison happens in
    float64 so masks do not depend on the attention dtype.
    """
    attention = check_attention(attention)
    lower_bound = check_lower_bound(lower_bound)
    if isinstance(t, torch.Tensor):
        t = t.to(attention.device)
        if t.dim() == 0:
            t = t.expand(attention.shape[0])
        if t.shape != (attention.shape[0], ):
            raise ValueError(f'time steps must be a scalar or have shape ({attention.shape[0]},), got {tuple(t.shape)}')
        t = t.double().view(-1, 1, 1, 1)
    budget = num_timesteps * (attention.double() + lower_bound)
    return (budget >= t).to(attention.dtype)


def diffused_steps_per_pixel(attention: torch.Tensor, lower_bound: Number, timesteps: torch.Tensor,
                             num_timesteps: int) -> torch.Tensor:
    """How many of the steps ``timesteps[1:]`` refine each pixel: (B, 1, H, W) long."""
    attention = check_attention(attention)
    budget = num_timesteps * (attention.double() + check_lower_bound(lower_bound))
    ts = torch.as_tensor(timesteps, device=attention.device).double()[1:]
    # budget >= t for t in ts  <=>  count of ts <= budget (ts ascending).
    return torch.searchsorted(ts.contiguous(), budget.contiguous(), right=True)


def pixel_update_ratio(attention: torch.Tensor, lower_bound: Number, timesteps: torch.Tensor,
                       num_timesteps: int) -> torch.Tensor:
    """Share of pixel updates versus full diffusion, per image (paper Fig. 4): (B,)."""
    steps = diffused_steps_per_pixel(attention, lower_bound, timesteps, num_timesteps)
    return steps.double().mean(dim=(1, 2, 3)) / (len(timesteps) - 1)
