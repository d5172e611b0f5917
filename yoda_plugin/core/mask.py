"""Time-dependent masks (paper Eq. 9), in one place: :class:`YODAMask`.

    M(t)_ij = 1  if  T * (A_ij + l) >= t,  else 0

A is the attention map in [0, 1], l in (0, 1) the lower bound and T the number
of *training* time steps. Pixel (i, j) is refined at the last
min(T, floor(T * (A_ij + l))) time steps, so every pixel gets at least
floor(T * l) steps and a pixel is never switched off once switched on
(sampling runs t = T..1). On a respaced sampling grid we keep the same rule
with t the training time step of each sampling step, i.e. the mask is defined
on normalised time t / T: the share of sampling steps a pixel is refined at is
the same on every grid.

Every grid gives every pixel at least one refinement step: the last sampling
step maps to the training step t_1 = round(T / K) <= T * l whenever
K >= 1 / l (K >= 3 for the default l = 0.4); on a coarser grid the last
step still refines the pixels with A >= t_1 / T - l. ``tests/test_core_mask_loss.py``
checks the 10-step grid by hand.

YODA off is one thing in the core: no mask (``None``) wherever a
``YODAMask`` is accepted; :meth:`yoda_plugin.core.YODAConfig.mask` returns it.
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


class YODAMask:
    """Eq. 9 for a batch of attention maps: the budget T * (A + l) is computed once (float64).

    ``mask.at(t)`` is M(t) for the training time step ``t`` (an int, or a
    tensor of shape (B,) with one step per sample as in training), shaped
    (B, 1, H, W) in ``dtype`` (default: the attention's dtype).
    """

    def __init__(self, attention: torch.Tensor, lower_bound: Number, num_train_timesteps: int):
        attention = check_attention(attention)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ValueError(f'num_train_timesteps must be a positive integer, got {num_train_timesteps!r}')
        self.lower_bound = check_lower_bound(lower_bound)
        self.num_train_timesteps = num_train_timesteps
        self.dtype = attention.dtype
        self.budget = num_train_timesteps * (attention.double() + self.lower_bound)  # T * (A + l)

    @property
    def shape(self):
        return self.budget.shape

    def at(self, t: Union[int, torch.Tensor], dtype: torch.dtype = None) -> torch.Tensor:
        """M(t): 1 where T * (A + l) >= t (Eq. 9)."""
        if isinstance(t, torch.Tensor):
            t = t.to(self.budget.device)
            if t.dim() == 0:
                t = t.expand(self.budget.shape[0])
            if t.shape != (self.budget.shape[0], ):
                raise ValueError(f'time steps must be a scalar or have shape ({self.budget.shape[0]},), '
                                 f'got {tuple(t.shape)}')
            t = t.double().view(-1, 1, 1, 1)
        return (self.budget >= t).to(dtype or self.dtype)

    def steps_per_pixel(self, timesteps: torch.Tensor) -> torch.Tensor:
        """How many of the sampling steps with training times ``timesteps[1:]`` refine each pixel: (B, 1, H, W)."""
        ts = torch.as_tensor(timesteps, device=self.budget.device).double()[1:]
        # budget >= t for t in ts  <=>  count of ts <= budget (ts ascending).
        return torch.searchsorted(ts.contiguous(), self.budget.contiguous(), right=True)

    def update_ratio(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Share of pixel updates versus full diffusion on that grid, per image (paper Fig. 4): (B,)."""
        return self.steps_per_pixel(timesteps).double().mean(dim=(1, 2, 3)) / (len(timesteps) - 1)

    def refined_share(self, t: torch.Tensor) -> torch.Tensor:
        """Share of each image's pixels with M(t) = 1 at every training time in ``t`` (paper Fig. 5): (B, len(t))."""
        budget = self.budget.flatten(1).sort(dim=1).values
        ts = torch.as_tensor(t, device=budget.device).double().flatten()
        # #{budget >= t} = n - #{budget < t}
        below = torch.searchsorted(budget.contiguous(), ts.expand(budget.shape[0], -1).contiguous(), right=False)
        return 1.0 - below.double() / budget.shape[1]

    def to(self, device) -> 'YODAMask':
        self.budget = self.budget.to(device)
        return self

    def crop(self, box) -> 'YODAMask':
        """The mask of the sub-image ``(top, bottom, left, right)`` (tiling, padding)."""
        out = object.__new__(YODAMask)
        out.__dict__.update(self.__dict__)
        out.budget = self.budget[..., box[0]:box[1], box[2]:box[3]]
        return out


def time_dependent_mask(attention: torch.Tensor, lower_bound: Number, t: Union[int, torch.Tensor],
                        num_timesteps: int) -> torch.Tensor:
    """Eq. 9 for a batch, as a function: ``YODAMask(attention, lower_bound, num_timesteps).at(t)``."""
    return YODAMask(attention, lower_bound, num_timesteps).at(t)


def diffused_steps_per_pixel(attention: torch.Tensor, lower_bound: Number, timesteps: torch.Tensor,
                             num_timesteps: int) -> torch.Tensor:
    """How many of the steps ``timesteps[1:]`` refine each pixel: (B, 1, H, W) long."""
    return YODAMask(attention, lower_bound, num_timesteps).steps_per_pixel(timesteps)


def pixel_update_ratio(attention: torch.Tensor, lower_bound: Number, timesteps: torch.Tensor,
                       num_timesteps: int) -> torch.Tensor:
    """Share of pixel updates versus full diffusion, per image (paper Fig. 4): (B,)."""
    return YODAMask(attention, lower_bound, num_timesteps).update_ratio(timesteps)
