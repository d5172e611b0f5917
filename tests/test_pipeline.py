"""The sampling pipeline (DiffusionSR) on real backbones: equal to the frozen DDPM reference bit for bit,
padding of sizes the network cannot take, tiles and sparse crops as wrappers of any adapter."""
import pytest
import torch

from conftest import mentions
from reference_ddpm import reference_sample_loop
from yoda_plugin.archs.sr3_unet_arch import SR3UNet
from yoda_plugin.archs.srdiff_arch import SRDiffNet
from yoda_plugin.core import (DiffusionSchedule, SamplerConfig, SparseConfig, SR3Adapter, SRDiffAdapter, TilingConfig,
                              YODAConfig, make_beta_schedule, pad_inputs)
from yoda_plugin.core.pipeline import DiffusionSR

SR3_NET = dict(in_channels=6, out_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attn_resolutions=(), image_size=16, dropout=0.0, norm_groups=4)
SRDIFF_NET = dict(scale=4, rrdb_num_feat=8, rrdb_num_block=2, rrdb_num_grow_ch=4, base_channels=8,
                  channel_mults=[1, 2], num_res_blocks=1)


pytestmark = pytest.mark.usefixtures('one_thread')


def schedule():
    return DiffusionSchedule(make_beta_schedule('linear', 40, 1e-4, 0.2))


def inputs(size=16, scale=4, batch=1):
    g = torch.Generator().manual_seed(1)
    lq = torch.rand(batch, 3, size // scale, size // scale, generator=g)
    lq_up = torch.nn.functional.interpolate(lq, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)
    att = torch.rand(batch, 1, size, size, generator=g)
    return lq, lq_up, att


def _sr3_reference(net, lq, lq_up, att, grid):
    cond = lq_up * 2 - 1
    ref = reference_sample_loop(lambda z, k: net(z, cond, grid.gather('sqrt_alphas_cumprod', k, z).view(-1)), grid,
                                cond, att, 0.3, 'marginal', True, torch.Generator().manual_seed(5))
    return ((ref + 1) / 2).clamp(0, 1)


def _srdiff_reference(net, lq, lq_up, att, grid):
    cond = net.project_condition(net.encode(lq))
    ref = reference_sample_loop(lambda z, k: net.denoise(z, grid.timesteps[k], cond), grid, torch.zeros_like(lq_up),
                                att, 0.3, 'marginal', True, torch.Generator().manual_seed(5))
    return (lq_up + ref.clamp(-1, 1) / 4).clamp(0, 1)


BACKBONES = {'sr3': (lambda: SR3UNet(**SR3_NET), _sr3_reference),
             'srdiff': (lambda: SRDiffNet(**SRDIFF_NET), _srdiff_reference)}


@pytest.mark.parametrize('backbone', ['sr3', 'srdiff'])
@pytest.mark.parametrize('yoda', [False, True])
@torch.no_grad()
def test_pipeline_equals_the_reference_ddpm_loop(backbone, yoda):
    make_net, reference = BACKBONES[backbone]
    torch.manual_seed(0)
    net = make_net().eval()
    lq, lq_up, att = inputs()
    cfg = YODAConfig(enabled=yoda, lower_bound=0.3)
    pipe = DiffusionSR(net, backbone, schedule(), 4, cfg, SamplerConfig(), default_steps=10)
    out, info = pipe(lq, lq_up, att, torch.Generator().manual_seed(5))
    assert torch.equal(out, reference(net, lq, lq_up, att if yoda else None, pipe.sampler.schedule))
    assert info['sparse_stats'] is None


@pytest.mark.parametrize('backbone', ['sr3', 'srdiff'])
@torch.no_grad()
def test_sizes_the_network_cannot_take_are_padded_and_cropped_back(backbone):
    torch.manual_seed(0)
    deep = {'channel_mults': [1, 2, 2, 2]}  # size multiple 8
    net = (SR3UNet(**{**SR3_NET, **deep}) if backbone == 'sr3' else SRDiffNet(**{**SRDIFF_NET, **deep})).eval()
    lq, lq_up, att = inputs(size=16)
    lq, lq_up, att = lq[..., :3, :], lq_up[..., :12, :], att[..., :12, :]  # 12 x 16: not a multiple of 8
    pipe = DiffusionSR(net, backbone, schedule(), 4, YODAConfig(), SamplerConfig(type='ddim', steps=5))
    out, _ = pipe(lq, lq_up, att, torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 12, 16) and bool(((out >= 0) & (out <= 1)).all())
    assert pipe.pad_multiple == 8
    padded = pad_inputs(lq, lq_up, att, pipe.pad_multiple, 4)
    assert [tuple(t.shape[-2:]) for t in padded] == [(4, 4), (16, 16), (16, 16)]
    with pytest.raises(ValueError, match=mentions('(3, 4)', 'scale 4', '(8, 16)')):
        pad_inputs(lq, lq_up[..., :8, :], None, 8, 4)


@torch.no_grad()
def test_tiles_and_sparse_wrap_the_srdiff_adapter():
    """Tiles of the whole image (one tile here) and sparse crops with a margin covering the image reproduce dense."""
    torch.manual_seed(0)
    net = SRDiffNet(**SRDIFF_NET).eval()
    lq, lq_up, att = inputs(size=32)
    att[..., :16, :] = 0.0
    cfg = YODAConfig(lower_bound=0.3)
    dense = DiffusionSR(net, 'srdiff', schedule(), 4, cfg, SamplerConfig(type='dpmpp_2m', steps=6))
    ref, _ = dense(lq, lq_up, att, torch.Generator().manual_seed(2))
    tiled = DiffusionSR(net, 'srdiff', schedule(), 4, cfg, SamplerConfig(type='dpmpp_2m', steps=6),
                        tiling=TilingConfig(tile_size=32, tile_overlap=8))
    assert torch.equal(tiled(lq, lq_up, att, torch.Generator().manual_seed(2))[0], ref)
    sparse = DiffusionSR(net, 'srdiff', schedule(), 4, cfg, SamplerConfig(type='dpmpp_2m', steps=6),
                         sparse=SparseConfig(enabled=True, mode='bbox', margin=0, max_fraction=1.0, region_cost=0))
    out, info = sparse(lq, lq_up, att, torch.Generator().manual_seed(2))
    stats = info['sparse_stats']
    assert stats['cropped_calls'] > 0 and stats['pixels'] < stats['dense_pixels']
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 0.5  # crops: an approximation for a UNet


def test_adapters_map_grid_steps_to_each_network_input():
    s = schedule().respace(10)
    k = torch.tensor([3])
    seen = {}

    class FakeSR3(torch.nn.Module):
        num_levels = 2

        def forward(self, z, cond, level):
            seen['level'] = level
            return torch.zeros_like(z)

    SR3Adapter(FakeSR3(), s, torch.zeros(1, 3, 8, 8))(torch.zeros(1, 3, 8, 8), k)
    assert torch.equal(seen['level'], s.sqrt_alphas_cumprod[3:4].float())  # continuous sqrt(abar) of step k

    class FakeSRDiff(torch.nn.Module):
        size_multiple = 4

        def encode(self, lq):
            return [lq]

        def project_condition(self, feats, box=None):
            return feats[0]

        def denoise(self, z, t, cond):
            seen['t'] = t
            return torch.zeros_like(z)

    adapter = SRDiffAdapter(FakeSRDiff(), s, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 1, time_offset=-1)
    adapter(torch.zeros(1, 3, 8, 8), k)
    assert seen['t'].tolist() == [int(s.timesteps[3]) - 1]  # integer training step t_k (+ offset)
    assert adapter.to_image(adapter.to_space(torch.full((1, 3, 8, 8), 0.1))).allclose(torch.full((1, 3, 8, 8), 0.1))
