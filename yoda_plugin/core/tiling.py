"""Tiled denoising for sampling large images with bounded memory (plain PyTorch).

A diffusion SR network run on a whole 2K image needs activations for every
pixel at once. :class:`TiledDenoiser` wraps a per-tile denoiser so that
:func:`~yoda_plugin.core.samplers.sample` can run unchanged on the whole
image: the state z_t, the YODA masks and the Gaussian noise stay global (the
noise is drawn once per step for the full image, so every tile sees the same
global noise a whole-image run sees), and only the network evaluation is split
into overlapping tiles whose noise predictions are blended at every step. Tiles
therefore never drift apart (no seams from independent trajectories).

Tile layout (:func:`tile_starts`): tiles of ``tile_size`` with at least
``overlap`` pixels shared by neighbours, starts on multiples of ``align``
(the network's downsampling factor / the SR scale, so every tile sees the
same down-sampling grid as the whole image); the last tile ends at the image
border, so it may overlap its neighbour by more.

Blending window (:func:`tile_window`): separable; along an axis, a tile's
weight is 1 in its interior and at the image border, and at a side shared
with a neighbour it is 0 within ``margin`` pixels of the tile edge, then a
raised-cosine ramp across the rest of the shared band that is complementary
to the neighbour's. Predictions within ``margin`` of an inner tile edge (the
ones hurt by the missing context and the zero/reflect padding there) get
weight exactly 0.

Exactness: blending is computed as ``ref + sum_i w_i (e_i - ref) / sum_i w_i``
with ``ref`` a tile's own prediction at that pixel: mathematically the
weighted mean, and bitwise equal to ``ref`` where all tiles agree. So for a
*local* denoiser whose receptive field radius is at most ``margin``, tiled
sampling equals whole-image sampling exactly. A U-Net is not local (large
receptive field; GroupNorm and attention act on the whole input), so for it
tiling is an approximation that improves with larger tiles and overlaps.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Box = Tuple[int, int, int, int]  # top, bottom, left, right (bottom/right exclusive)
TileDenoiseFn = Callable[[torch.Tensor, torch.Tensor, Box], torch.Tensor]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_tiling(tile_size: int, overlap: int, margin: Optional[int] = None, align: int = 1,
                 where: str = 'val') -> Tuple[int, int, int]:
    """Validate tiling options; returns ``(tile_size, overlap, margin)`` (margin default: overlap // 4)."""
    if not _is_int(align) or align < 1:
        raise ValueError(f'tile alignment must be a positive integer, got {align!r}')
    if not _is_int(tile_size) or tile_size < 1 or tile_size % align:
        raise ValueError(f'{where}.tile_size must be a positive multiple of {align} (the network\'s size multiple '
                         f'and the scale), got {tile_size!r}')
    if not _is_int(overlap) or overlap < 0 or overlap % align or overlap >= tile_size:
        raise ValueError(f'{where}.tile_overlap must be a multiple of {align} in [0, tile_size={tile_size}), '
                         f'got {overlap!r}')
    if margin is None:
        margin = overlap // 4
    if not _is_int(margin) or margin < 0 or (overlap and 2 * margin >= overlap):
        raise ValueError(f'{where}.tile_margin must be an integer >= 0 with 2 * margin < tile_overlap={overlap}, '
                         f'got {margin!r}')
    return tile_size, overlap, margin


def tile_starts(length: int, tile_size: int, overlap: int, align: int = 1) -> List[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    Tiles advance by ``tile_size - overlap``; the last one is moved back to
    end at ``length`` (it then overlaps its neighbour by at least ``overlap``).
    ``length`` <= ``tile_size`` gives one tile covering the axis.
    """
    if length % align:
        raise ValueError(f'image size {length} is not a multiple of the tile alignment {align}; pad it first')
    if length <= tile_size:
        return [0]
    step = tile_size - overlap
    if step <= 0:
        raise ValueError(f'tile_size {tile_size} must exceed overlap {overlap}')
    starts = list(range(0, length - tile_size, step))
    starts.append(length - tile_size)
    return starts


def tile_boxes(height: int, width: int, tile_size: int, overlap: int, align: int = 1) -> List[Box]:
    """All tiles of a ``height`` x ``width`` image, row by row, as (top, bottom, left, right)."""
    ys = tile_starts(height, tile_size, overlap, align)
    xs = tile_starts(width, tile_size, overlap, align)
    th, tw = min(tile_size, height), min(tile_size, width)
    return [(y, y + th, x, x + tw) for y in ys for x in xs]


def _ramp(n: int) -> torch.Tensor:
    """Raised-cosine ramp from ~0 to ~1 over n pixels (pixel centres), float64, strictly inside (0, 1)."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return 0.5 - 0.5 * torch.cos(math.pi * pos)


def axis_window(starts: Sequence[int], index: int, size: int, margin: int) -> torch.Tensor:
    """1-D blending weights (float64, ``size``) of tile ``index`` among tiles at ``starts`` of width ``size``."""
    w = torch.ones(size, dtype=torch.float64)
    s = starts[index]
    if index > 0:  # shared band with the previous tile: [s, previous end)
        band = starts[index - 1] + size - s
        ramp_len = band - 2 * margin
        w[:margin] = 0
        w[margin:margin + ramp_len] *= _ramp(ramp_len)
    if index < len(starts) - 1:  # shared band with the next tile: [next start, s + size)
        band = s + size - starts[index + 1]
        ramp_len = band - 2 * margin
        lo = size - band + margin
        w[lo:lo + ramp_len] *= 1 - _ramp(ramp_len)
        w[size - margin:] = 0
    return w


def tile_window(height: int, width: int, box: Box, tile_size: int, overlap: int, margin: int,
                align: int = 1) -> torch.Tensor:
    """2-D window (float64, (h, w)) of ``box`` in the layout of :func:`tile_boxes`."""
    ys = tile_starts(height, tile_size, overlap, align)
    xs = tile_starts(width, tile_size, overlap, align)
    top, bottom, left, right = box
    wy = axis_window(ys, ys.index(top), bottom - top, margin)
    wx = axis_window(xs, xs.index(left), right - left, margin)
    return wy[:, None] * wx[None, :]


@dataclass
class TilingConfig:
    """``val.tile_size`` / ``val.tile_overlap`` / ``val.tile_margin`` in HR pixels; ``tile_size`` null: whole image."""
    tile_size: Optional[int] = None
    tile_overlap: int = 0
    tile_margin: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.tile_size is not None

    def checked(self, align: int) -> 'TilingConfig':
        """The settings validated for a network of size multiple ``align`` (margin default filled in)."""
        if not self.enabled:
            return self
        size, overlap, margin = check_tiling(self.tile_size, self.tile_overlap or 0, self.tile_margin, align)
        if overlap == 0:
            raise ValueError('val.tile_overlap must be > 0 with tiled sampling (val.tile_size set)')
        return TilingConfig(size, overlap, margin)

    def net_fn(self, net_fn: Callable, height: int, width: int, align: int) -> Callable:
        """``net_fn`` evaluated in tiles (itself when tiling is off)."""
        if not self.enabled:
            return net_fn
        t = self.checked(align)
        return tiled_net_fn(net_fn, height, width, t.tile_size, t.tile_overlap, t.tile_margin, align)


class TiledDenoiser:
    """``(z_in, k, mask=None) -> eps`` for :func:`~yoda_plugin.core.samplers.sample`, evaluated tile by tile and blended.

    ``denoise_tile(z_tile, k, box)`` returns the prediction for the crop
    ``z_in[..., top:bottom, left:right]`` of the full image; ``box`` lets it
    crop its own conditioning (LR features, upsampled LR image) to match.
    ``tile_size=None`` (or an image no larger than a tile) runs the whole
    image as one tile. ``origin=(top, left)`` places this ``height`` x
    ``width`` area inside a larger image: the boxes given to ``denoise_tile``
    are then in that image's coordinates (see :func:`tiled_net_fn`).
    """

    def __init__(self, denoise_tile: TileDenoiseFn, height: int, width: int, tile_size: Optional[int],
                 overlap: int = 0, margin: Optional[int] = None, align: int = 1, origin: Tuple[int, int] = (0, 0)):
        top, left = origin
        self.denoise_tile = denoise_tile
        if top or left:
            def shifted(z_in, k, box):
                return denoise_tile(z_in, k, (box[0] + top, box[1] + top, box[2] + left, box[3] + left))

            self.denoise_tile = shifted
        self.height, self.width = height, width
        if tile_size is None or (height <= tile_size and width <= tile_size):
            self.boxes = [(0, height, 0, width)]
            self.windows = [None]
            return
        tile_size, overlap, margin = check_tiling(tile_size, overlap, margin, align)
        if overlap == 0:
            raise ValueError('tiled sampling needs tile_overlap > 0 to blend neighbouring tiles')
        self.boxes = tile_boxes(height, width, tile_size, overlap, align)
        self.windows = [tile_window(height, width, b, tile_size, overlap, margin, align) for b in self.boxes]
        self._device_windows = {}

    @property
    def num_tiles(self) -> int:
        return len(self.boxes)

    def _window(self, i: int, like: torch.Tensor) -> torch.Tensor:
        key = (i, like.device, like.dtype)
        w = self._device_windows.get(key)
        if w is None:
            w = self.windows[i].to(device=like.device, dtype=like.dtype)[None, None]
            self._device_windows[key] = w
        return w

    def __call__(self, z_in: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tuple(z_in.shape[-2:]) != (self.height, self.width):
            raise ValueError(f'TiledDenoiser built for {self.height}x{self.width}, got {tuple(z_in.shape[-2:])}')
        if len(self.boxes) == 1:
            return self.denoise_tile(z_in, k, self.boxes[0])
        ref = acc = None
        have = torch.zeros((1, 1, self.height, self.width), dtype=torch.bool, device=z_in.device)
        wsum = torch.zeros((1, 1, self.height, self.width), dtype=z_in.dtype, device=z_in.device)
        for i, (top, bottom, left, right) in enumerate(self.boxes):
            eps = self.denoise_tile(z_in[..., top:bottom, left:right], k, (top, bottom, left, right))
            if ref is None:
                ref = torch.zeros(z_in.shape[:-3] + eps.shape[-3:-2] + z_in.shape[-2:], dtype=eps.dtype,
                                  device=eps.device)
                acc = torch.zeros_like(ref)
            w = self._window(i, eps)
            pos = w > 0
            region = (..., slice(top, bottom), slice(left, right))
            new = pos & ~have[region]
            ref[region] = torch.where(new, eps, ref[region])  # first positive-weight tile sets the reference
            have[region] |= pos
            acc[region] += w * (eps - ref[region])
            wsum[region] += w
        return ref + acc / wsum


def tiled_net_fn(denoise_tile: TileDenoiseFn, height: int, width: int, tile_size: Optional[int], overlap: int = 0,
                 margin: Optional[int] = None, align: int = 1) -> Callable:
    """``net_fn(z_in, k, box)`` for :class:`~yoda_plugin.core.sparse.SparseDenoiser` that tiles every call.

    ``box=None`` evaluates the whole ``height`` x ``width`` image, a box the
    crop ``z_in`` at that place; both in tiles of the same layout rules (a crop
    no larger than a tile is one call). ``denoise_tile`` always receives boxes
    in whole-image coordinates, so it can crop its conditioning.
    """
    whole = TiledDenoiser(denoise_tile, height, width, tile_size, overlap, margin, align)

    def net_fn(z_in: torch.Tensor, k: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
        if box is None:
            return whole(z_in, k)
        top, bottom, left, right = box
        return TiledDenoiser(denoise_tile, bottom - top, right - left, tile_size, overlap, margin, align,
                             (top, left))(z_in, k)

    net_fn.num_tiles = whole.num_tiles  # of the whole image
    return net_fn
