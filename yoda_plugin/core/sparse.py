"""Sparse YODA sampling: evaluate the network only where the time-dependent mask needs it.

With Eq. 11 the network sees M(t) * z_t and Eq. 14 keeps its prediction only
where M(t) = 1, so the noise prediction outside the mask is never used. We
crop the network input to the bounding box of the active pixels (union over
the batch), widened by ``margin`` pixels of context and aligned to the UNet's
downsampling factor, and fall back to the whole image once that box covers
more than ``max_fraction`` of it. Steps whose mask is empty call no network at
all (handled in :func:`yoda_plugin.core.sampler.sample_loop`).

For a purely local network (convolutions only) a margin that covers its
receptive field reproduces dense sampling to float precision. GroupNorm
statistics and self-attention are global, so for the SR3 UNet cropping is an
approximation whose error ``scripts/benchmark_yoda_overhead.py`` measures.
"""
from typing import Callable, Optional, Tuple

import torch

Box = Tuple[int, int, int, int]  # top, bottom, left, right (bottom/right exclusive)


def active_box(mask: torch.Tensor, margin: int, multiple: int) -> Optional[Box]:
    """Bounding box of ``mask > 0`` over the batch, widened and aligned; None if the mask is empty."""
    if margin < 0 or multiple < 1:
        raise ValueError(f'margin must be >= 0 and multiple >= 1, got {margin} and {multiple}')
    H, W = mask.shape[-2:]
    active = mask.reshape(-1, H, W).amax(dim=0) > 0
    rows = torch.nonzero(active.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(active.any(dim=0)).flatten()
    top, bottom = int(rows[0]) - margin, int(rows[-1]) + 1 + margin
    left, right = int(cols[0]) - margin, int(cols[-1]) + 1 + margin

    def align(lo, hi, size):
        lo = max(0, lo // multiple * multiple)
        hi = min(size, -(-hi // multiple) * multiple)
        # Keep the crop a multiple of `multiple` even when the image side is not.
        span = -(-(hi - lo) // multiple) * multiple
        if lo + span > size:
            lo = max(0, size - span)
        return lo, min(size, lo + span)

    top, bottom = align(top, bottom, H)
    left, right = align(left, right, W)
    return top, bottom, left, right


class SparseDenoiser:
    """``denoise_fn(z_in, k, mask)`` for :func:`sample_loop` that crops to the active region.

    ``net_fn(z_crop, k, box)`` must return the noise prediction for the crop;
    ``box`` is None for a whole-image call (the caller crops its condition,
    e.g. ``cond[..., t:b, l:r]``). ``stats`` counts calls and evaluated pixels.
    """

    def __init__(self, net_fn: Callable, margin: int = 32, multiple: int = 16, max_fraction: float = 0.7):
        if not 0 < max_fraction <= 1:
            raise ValueError(f'sparse.max_fraction must be in (0, 1], got {max_fraction}')
        self.net_fn, self.margin, self.multiple, self.max_fraction = net_fn, int(margin), int(multiple), max_fraction
        self.stats = {'calls': 0, 'cropped_calls': 0, 'pixels': 0, 'dense_pixels': 0}

    def __call__(self, z_in: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        H, W = z_in.shape[-2:]
        self.stats['calls'] += 1
        self.stats['dense_pixels'] += H * W
        box = None if mask is None else active_box(mask, self.margin, self.multiple)
        if box is None or (box[1] - box[0]) * (box[3] - box[2]) > self.max_fraction * H * W:
            self.stats['pixels'] += H * W
            return self.net_fn(z_in, k, None)
        t, b, l, r = box
        self.stats['cropped_calls'] += 1
        self.stats['pixels'] += (b - t) * (r - l)
        eps = torch.zeros_like(z_in)  # outside the box the mask is 0: Eq. 14 ignores these values
        eps[..., t:b, l:r] = self.net_fn(z_in[..., t:b, l:r], k, box)
        return eps
