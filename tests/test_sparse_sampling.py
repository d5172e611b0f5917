"""Sparse YODA sampling: crop logic exact for a local network; empty-mask steps call no network."""
import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import mentions
from yoda_plugin.core import (DDPMSampler, DiffusionSchedule, SparseDenoiser, YODAConfig, active_box, active_regions,
                              make_beta_schedule, sample)


def test_active_box_hand_cases():
    mask = torch.zeros(2, 1, 32, 32)
    mask[1, 0, 5, 9] = 1
    assert active_box(mask, margin=2, multiple=4) == (0, 8, 4, 12)
    assert active_box(mask, margin=0, multiple=1) == (5, 6, 9, 10)
    assert active_box(torch.zeros(1, 1, 8, 8), 2, 4) is None
    mask[0, 0, 30, 31] = 1  # union over the batch, clamped to the image
    assert active_box(mask, margin=3, multiple=8) == (0, 32, 0, 32)
    with pytest.raises(ValueError):
        active_box(mask, -1, 4)


def test_box_stays_aligned_on_odd_image_sizes():
    mask = torch.zeros(1, 1, 30, 30)
    mask[..., 27, 27] = 1
    t, b, l, r = active_box(mask, margin=1, multiple=8)
    assert (b - t) % 8 == 0 and (r - l) % 8 == 0 and b <= 30 and r <= 30


def local_net():
    """Three 3x3 convolutions: a receptive field radius of 3 pixels, no global statistics."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                               torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))


def local_case(size, blobs):
    """A local network's ``net_fn``, and ``run(fn)`` sampling with it from fixed noise (the dense run: fn=None)."""
    net = local_net()
    sampler = DDPMSampler(DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05)), 25)
    cond = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    att = torch.zeros(2, 1, size, size)
    for b, top, bottom, left, right, value in blobs:  # high-attention regions: refined early, the rest late
        att[b, 0, top:bottom, left:right] = value

    def net_fn(z, k, box):
        c = cond if box is None else cond[..., box[0]:box[1], box[2]:box[3]]
        return net(torch.cat([c, z], 1)) * 0.1

    def run(fn=None):
        yoda_sampler = YODAConfig(lower_bound=0.2).wrap(sampler, att, cond)
        return sample(fn or (lambda z, k, mask: net_fn(z, k, None)), yoda_sampler, cond, torch.Generator().manual_seed(1))

    return net_fn, run


@torch.no_grad()
def test_sparse_equals_dense_for_a_local_network():
    net_fn, run = local_case(48, [(0, 4, 14, 6, 20, 1.0), (1, 8, 12, 8, 12, 0.8)])
    sparse = SparseDenoiser(net_fn, margin=4, multiple=4, max_fraction=0.7)
    a, b = run(), run(sparse)
    assert sparse.stats['cropped_calls'] > 0 and sparse.stats['pixels'] < sparse.stats['dense_pixels']
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # Too little context breaks exactness: the test can tell.
    assert not torch.allclose(a, run(SparseDenoiser(net_fn, margin=0, multiple=1, max_fraction=0.7)), atol=1e-5)


@torch.no_grad()
def test_steps_with_empty_mask_call_no_network():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05))
    calls = []

    def fn(z, k, mask):
        calls.append(int(k[0]))
        return torch.zeros_like(z)

    att = torch.zeros(1, 1, 8, 8)  # every pixel refined only for the last T * l = 30 steps
    x = torch.zeros(1, 3, 8, 8)
    sample(fn, YODAConfig(lower_bound=0.3).wrap(DDPMSampler(schedule), att, x), x)
    assert calls == list(range(30, 0, -1))


def test_sparse_falls_back_to_dense_for_large_regions():
    seen = []
    den = SparseDenoiser(lambda z, k, box: (seen.append(box), torch.zeros_like(z))[1], margin=0, multiple=1,
                         max_fraction=0.5)
    mask = torch.ones(1, 1, 8, 8)
    den(torch.zeros(1, 3, 8, 8), torch.ones(1, dtype=torch.long), mask)
    mask[..., 4:, :] = 0
    mask[..., :, 4:] = 0
    den(torch.zeros(1, 3, 8, 8), torch.ones(1, dtype=torch.long), mask)
    assert seen == [None, (0, 4, 0, 4)]
    # The fallback counts region_cost per extra call, as the region search does: two 2x2 crops of a 16x16
    # image are 8 px, plus 100 px for the second call: above 0.4 * 256 = 102.4 px, so one whole-image call.
    corners = torch.zeros(1, 1, 16, 16)
    corners[..., :2, :2] = corners[..., -2:, -2:] = 1
    seen.clear()
    for cost in (0, 100):
        den = SparseDenoiser(lambda z, k, box: (seen.append(box), torch.zeros_like(z))[1], margin=0, multiple=1,
                             max_fraction=0.4, mode='regions', region_cost=cost)
        den(torch.zeros(1, 3, 16, 16), torch.ones(1, dtype=torch.long), corners)
    assert seen == [(0, 2, 0, 2), (14, 16, 14, 16), None]


def test_active_regions_hand_cases():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 2:5, 3:9] = 1
    mask[..., 40:50, 50:60] = 1
    # Two blobs: two crops instead of the 64x64 hull; cores are the blobs' boxes.
    assert active_regions(mask, margin=0, multiple=16) == [((2, 5, 3, 9), (0, 16, 0, 16)),
                                                           ((40, 50, 50, 60), (32, 64, 48, 64))]
    assert active_box(mask, 0, 16) == (0, 64, 0, 64)
    # A per-call cost above the saving merges them into one crop.
    assert active_regions(mask, 0, 16, region_cost=4096) == [((2, 50, 3, 60), (0, 64, 0, 64))]
    # Two vertical strips: cut along columns, not rows.
    strips = torch.zeros(1, 1, 64, 64)
    strips[..., :, :8] = 1
    strips[..., :, -8:] = 1
    assert active_regions(strips, 0, 8) == [((0, 64, 0, 8), (0, 64, 0, 8)), ((0, 64, 56, 64), (0, 64, 56, 64))]
    assert active_regions(torch.zeros(1, 1, 16, 16), 0, 8) == []
    # An L shape, margin 8 on a 16 grid: band edges sit at 8 (mod 16), so the cut at row 56 widened by the
    # margin lands on the grid (crops 64 x 128 + 80 x 32 = 10752 px; bands on 0 mod 16 would cut at 64: 12800).
    ell = torch.zeros(1, 1, 128, 128)
    ell[..., :56, :] = 1
    ell[..., 56:, :16] = 1
    assert active_regions(ell, 8, 16) == [((0, 56, 0, 128), (0, 64, 0, 128)), ((56, 128, 0, 16), (48, 128, 0, 32))]
    assert active_regions(ell, 16, 16) == [((0, 64, 0, 128), (0, 80, 0, 128)), ((64, 128, 0, 16), (48, 128, 0, 32))]
    with pytest.raises(ValueError, match='granularity'):
        active_regions(mask, 0, 16, granularity=0)
    with pytest.raises(ValueError, match=mentions('mode', "'tiles'")):
        SparseDenoiser(None, mode='tiles')


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 3), st.integers(0, 9), st.sampled_from([1, 4, 8]),
       st.sampled_from([None, 4, 8]), st.sampled_from([0, 64]), st.integers(0, 2**31 - 1))
def test_active_regions_cover_every_active_pixel_once(height, width, blobs, margin, multiple, granularity, cost, seed):
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, height, width, generator=g) > 0.97).float()
    for _ in range(blobs):
        y, x = (int(v) for v in torch.randint(0, 64, (2, ), generator=g))
        mask[0, 0, y % height:y % height + 5, x % width:x % width + 7] = 1
    regions = active_regions(mask, margin, multiple, granularity, cost)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for (ct, cb, cl, cr), (t, b, l, r) in regions:
        assert 0 <= t <= ct < cb <= b <= height and 0 <= l <= cl < cr <= r <= width  # crop holds its core
        assert (b - t) % multiple == 0 or b - t == height  # crops keep the network's size multiple
        assert (r - l) % multiple == 0 or r - l == width
        assert t % multiple == 0 or b == height
        assert ct - t >= min(margin, ct) and b - cb >= min(margin, height - cb)  # context on every side
        assert cl - l >= min(margin, cl) and r - cr >= min(margin, width - cr)
        covered[ct:cb, cl:cr] += 1
    active = mask.amax(dim=(0, 1)) > 0
    assert int(covered.max()) <= 1  # cores are disjoint
    assert bool((covered[active] == 1).all())  # and hold every active pixel
    box = active_box(mask, margin, multiple)
    area = sum((b - t) * (r - l) for _, (t, b, l, r) in regions)
    if box is not None:  # never worse than the one bounding box
        assert area + cost * len(regions) <= (box[1] - box[0]) * (box[3] - box[2]) + cost


@torch.no_grad()
def test_region_sparse_equals_dense_for_a_local_network():
    # Two far-apart blobs in one image, one in the other: several crops per step.
    net_fn, run = local_case(64, [(0, 2, 10, 2, 14, 1.0), (0, 48, 60, 44, 62, 0.9), (1, 30, 34, 4, 10, 0.8)])
    regions = SparseDenoiser(net_fn, margin=3, multiple=4, max_fraction=0.9, mode='regions')
    bbox = SparseDenoiser(net_fn, margin=3, multiple=4, max_fraction=0.9, mode='bbox')
    dense, a = run(), run(regions)
    run(bbox)
    assert regions.stats['crops'] > regions.stats['cropped_calls'] > 0
    assert regions.stats['pixels'] < bbox.stats['pixels']  # the blobs' boxes instead of their hull
    assert torch.allclose(dense, a, atol=1e-5), float((dense - a).abs().max())
    narrow = SparseDenoiser(net_fn, margin=1, multiple=1, max_fraction=0.9, mode='regions')
    assert not torch.allclose(dense, run(narrow), atol=1e-5)  # a margin below the receptive field (3) is not exact
