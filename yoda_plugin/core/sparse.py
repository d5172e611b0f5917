"""Sparse YODA sampling: evaluate the network only where the time-dependent mask needs it.

With Eq. 11 the network sees M(t) * z_t and Eq. 14 keeps its prediction only
where M(t) = 1, so the noise prediction outside the mask is never used. Two
ways to crop the network input (the active set is the union over the batch):

* ``bbox``: one crop, the bounding box of the active pixels widened by
  ``margin`` pixels of context and aligned to the UNet's downsampling factor.
* ``regions``: the image is cut into horizontal (or vertical, whichever is
  cheaper) bands of ``granularity`` pixels; a dynamic programme groups
  consecutive bands into crops so that the evaluated area plus ``region_cost``
  pixels per network call is smallest. Each crop is the bounding box of the
  active pixels of its bands (its *core*) widened by the margin and aligned;
  its prediction is kept on the core only. Cores are disjoint, so every
  active pixel gets exactly one prediction. A ring-shaped or several-blob
  mask costs the area near the active pixels instead of their whole hull.

Either falls back to one whole-image call once the crops cost more than
``max_fraction`` of the image (cost: evaluated pixels plus ``region_cost`` per
extra network call; on CPU a crop's time is about proportional to its area, so
the default 0.9 leaves a margin for the cropping itself). Steps whose mask is
empty call no network at all (handled in :func:`yoda_plugin.core.samplers.sample`).

For a purely local network (convolutions only) a margin that covers its
receptive field reproduces dense sampling to float precision (tested).
GroupNorm statistics and self-attention are global, so for the SR3 UNet
cropping is an approximation whose error ``scripts/benchmark_yoda_overhead.py``
measures.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

Box = Tuple[int, int, int, int]  # top, bottom, left, right (bottom/right exclusive)
Region = Tuple[Box, Box]  # (core: where the prediction is kept, crop: what the network sees)
SPARSE_MODES = ('bbox', 'regions')


def _check(margin: int, multiple: int):
    if margin < 0 or multiple < 1:
        raise ValueError(f'margin must be >= 0 and multiple >= 1, got {margin} and {multiple}')


def _align(lo: int, hi: int, size: int, multiple: int) -> Tuple[int, int]:
    """Widen [lo, hi) to start on a multiple of ``multiple`` with a length that is one, inside [0, size)."""
    lo = max(0, lo // multiple * multiple)
    hi = min(size, -(-hi // multiple) * multiple)
    span = -(-(hi - lo) // multiple) * multiple  # keep the crop a multiple even when the side is not
    if lo + span > size:
        lo = max(0, size - span)
    return lo, min(size, lo + span)


def crop_for(core: Box, margin: int, multiple: int, height: int, width: int) -> Box:
    """The network crop around ``core``: widened by ``margin`` and aligned to ``multiple``."""
    top, bottom = _align(core[0] - margin, core[1] + margin, height, multiple)
    left, right = _align(core[2] - margin, core[3] + margin, width, multiple)
    return top, bottom, left, right


def _union(mask: torch.Tensor) -> torch.Tensor:
    H, W = mask.shape[-2:]
    return mask.reshape(-1, H, W).amax(dim=0) > 0


def active_box(mask: torch.Tensor, margin: int, multiple: int) -> Optional[Box]:
    """Bounding box of ``mask > 0`` over the batch, widened and aligned; None if the mask is empty."""
    _check(margin, multiple)
    active = _union(mask)
    rows = torch.nonzero(active.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(active.any(dim=0)).flatten()
    core = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    return crop_for(core, margin, multiple, *active.shape)


def _band_regions(active: torch.Tensor, margin: int, multiple: int, granularity: int,
                  region_cost: float) -> Tuple[float, List[Region]]:
    """Optimal grouping of consecutive horizontal bands of ``active`` (H, W) into crops; (cost, regions)."""
    H, W = active.shape
    # Band edges sit at ``margin`` (mod ``multiple``) so that a group edge widened by the margin lands on the
    # alignment grid: a split between two crops then costs 2 * margin rows, not 2 * margin rounded up to the grid.
    shift = (granularity - margin % multiple) % granularity
    bands = -(-(H + shift) // granularity)
    padded = torch.zeros(bands * granularity, W, dtype=torch.bool, device=active.device)
    padded[shift:shift + H] = active
    padded = padded.view(bands, granularity, W)
    band_cols, band_rows = padded.any(dim=1), padded.any(dim=2)  # (bands, W), (bands, granularity)

    def first_last(x):  # index of the first and one past the last True per row (x must have one)
        n = x.shape[1]
        idx = torch.arange(n, device=x.device)
        return (torch.where(x, idx, n).amin(dim=1).tolist(), (torch.where(x, idx, -1).amax(dim=1) + 1).tolist())

    has = band_cols.any(dim=1).tolist()
    col_lo, col_hi = first_last(band_cols)
    row_lo, row_hi = first_last(band_rows)
    col_lo = [c if h else None for c, h in zip(col_lo, has)]
    row_lo = [b * granularity + r - shift for b, r in enumerate(row_lo)]
    row_hi = [b * granularity + r - shift for b, r in enumerate(row_hi)]

    best = [0.0] + [float('inf')] * bands  # best[j]: cheapest cover of bands < j
    choice = [None] * (bands + 1)
    for j in range(1, bands + 1):
        if col_lo[j - 1] is None:  # an empty band needs no crop
            best[j], choice[j] = best[j - 1], (j - 1, None)
            continue
        lo, hi, bottom = W, 0, row_hi[j - 1]
        for i in range(j - 1, -1, -1):  # group bands [i, j); its core grows as i moves up
            if col_lo[i] is None:
                continue  # a group starts on an active band (an empty first band is covered above)
            lo, hi = min(lo, col_lo[i]), max(hi, col_hi[i])
            core = (row_lo[i], bottom, lo, hi)
            crop = crop_for(core, margin, multiple, H, W)
            cost = best[i] + (crop[1] - crop[0]) * (crop[3] - crop[2]) + region_cost
            if cost <= best[j]:  # ties: the larger group (fewer network calls)
                best[j], choice[j] = cost, (i, (core, crop))
    regions, j = [], bands
    while j > 0:
        i, region = choice[j]
        if region is not None:
            regions.append(region)
        j = i
    return best[bands], regions[::-1]


def active_regions(mask: torch.Tensor, margin: int, multiple: int, granularity: Optional[int] = None,
                   region_cost: float = 0.0) -> List[Region]:
    """Crops covering ``mask > 0`` (union over the batch) at least cost; [] if the mask is empty.

    Each region is ``(core, crop)``: the network runs on ``crop`` and its
    prediction is kept on ``core``; cores are disjoint and hold every active
    pixel. Bands are ``granularity`` pixels (default: ``multiple``) along rows
    or columns, whichever gives the cheaper cover.
    """
    _check(margin, multiple)
    granularity = multiple if granularity is None else int(granularity)
    if granularity < 1 or region_cost < 0:
        raise ValueError(f'granularity must be >= 1 and region_cost >= 0, got {granularity} and {region_cost}')
    active = _union(mask)
    if not bool(active.any()):
        return []
    cost_rows, by_rows = _band_regions(active, margin, multiple, granularity, region_cost)
    cost_cols, by_cols = _band_regions(active.t(), margin, multiple, granularity, region_cost)
    if cost_cols < cost_rows:
        swap = lambda b: (b[2], b[3], b[0], b[1])  # noqa: E731
        return [(swap(core), swap(crop)) for core, crop in by_cols]
    return by_rows


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_sparse(margin, max_fraction, mode, granularity, region_cost, where: str = 'sparse'):
    """Validate the sparse-sampling settings; errors name ``where.<key>``."""
    if not _is_int(margin) or margin < 0:
        raise ValueError(f'{where}.margin must be an integer >= 0 (pixels of context), got {margin!r}')
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not 0 < max_fraction <= 1:
        raise ValueError(f'{where}.max_fraction must be in (0, 1], got {max_fraction!r}')
    if mode not in SPARSE_MODES:
        raise ValueError(f'{where}.mode must be one of {SPARSE_MODES}, got {mode!r}')
    if granularity is not None and (not _is_int(granularity) or granularity < 1):
        raise ValueError(f'{where}.granularity must be an integer >= 1 (pixels; null: the size multiple), '
                         f'got {granularity!r}')
    if not isinstance(region_cost, (int, float)) or isinstance(region_cost, bool) or not region_cost >= 0:
        raise ValueError(f'{where}.region_cost must be >= 0 (pixels charged per network call), got {region_cost!r}')


@dataclass
class SparseConfig:
    """The ``val.sparse`` section: crop the network input to the active mask regions (YODA only)."""
    enabled: bool = False
    mode: str = 'regions'
    margin: int = 32
    max_fraction: float = 0.9
    granularity: Optional[int] = None
    region_cost: float = 1024

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f'val.sparse.enabled must be true or false, got {self.enabled!r}')
        check_sparse(self.margin, self.max_fraction, self.mode, self.granularity, self.region_cost, 'val.sparse')

    def denoiser(self, net_fn: Callable, multiple: int) -> 'SparseDenoiser':
        return SparseDenoiser(net_fn, self.margin, multiple, self.max_fraction, self.mode, self.granularity,
                              self.region_cost)


class SparseDenoiser:
    """The denoiser ``(z_in, k, mask)`` of :func:`~yoda_plugin.core.samplers.sample` that crops to the active
    region(s).

    ``net_fn(z_crop, k, box)`` must return the noise prediction for the crop;
    ``box`` is None for a whole-image call (the caller crops its condition,
    e.g. ``cond[..., t:b, l:r]``). ``stats`` counts calls, crops and evaluated
    pixels (``pixels / dense_pixels`` is the share of the dense cost).
    """

    def __init__(self, net_fn: Callable, margin: int = 32, multiple: int = 16, max_fraction: float = 0.9,
                 mode: str = 'bbox', granularity: Optional[int] = None, region_cost: float = 0.0):
        check_sparse(margin, max_fraction, mode, granularity, region_cost)
        if not _is_int(multiple) or multiple < 1:
            raise ValueError(f'sparse crops need a size multiple >= 1 (the UNet factor), got {multiple!r}')
        self.net_fn, self.margin, self.multiple, self.max_fraction = net_fn, int(margin), int(multiple), max_fraction
        self.mode, self.granularity, self.region_cost = mode, granularity, float(region_cost)
        self.stats = {'calls': 0, 'cropped_calls': 0, 'crops': 0, 'pixels': 0, 'dense_pixels': 0}

    def regions(self, mask: torch.Tensor) -> List[Region]:
        if self.mode == 'bbox':
            box = active_box(mask, self.margin, self.multiple)
            return [] if box is None else [(box, box)]
        return active_regions(mask, self.margin, self.multiple, self.granularity, self.region_cost)

    def __call__(self, z_in: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        H, W = z_in.shape[-2:]
        self.stats['calls'] += 1
        self.stats['dense_pixels'] += H * W
        regions = [] if mask is None else self.regions(mask)
        area = sum((b - t) * (r - l) for _, (t, b, l, r) in regions)
        if not regions or area + (len(regions) - 1) * self.region_cost > self.max_fraction * H * W:
            self.stats['pixels'] += H * W
            return self.net_fn(z_in, k, None)
        self.stats['cropped_calls'] += 1
        self.stats['crops'] += len(regions)
        self.stats['pixels'] += area
        eps = torch.zeros_like(z_in)  # outside the cores the mask is 0: Eq. 14 ignores these values
        for (ct, cb, cl, cr), (t, b, l, r) in regions:
            out = self.net_fn(z_in[..., t:b, l:r], k, (t, b, l, r))
            eps[..., ct:cb, cl:cr] = out[..., ct - t:cb - t, cl - l:cr - l]
        return eps
