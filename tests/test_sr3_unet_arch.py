"""Tests of the SR3 U-Net (yoda_plugin/archs/sr3_unet_arch.py)."""
import pytest
import torch

import yoda_plugin  # noqa: F401  (installs the torchvision shim, registers archs)
from basicsr.archs import build_network
from yoda_plugin.archs.sr3_unet_arch import AttnBlock, SR3UNet

SMALL = dict(in_channels=6, out_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
             attn_resolutions=(16, ), image_size=32, dropout=0.0, norm_groups=8)

# Measured for SR3UNet() (paper configuration); see the class docstring.
PAPER_PARAMS = 128_817_731


def small(**kw):
    torch.manual_seed(0)
    return SR3UNet(**{**SMALL, **kw})


def inputs(b=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, size, size, generator=g)
    cond = torch.randn(b, 3, size, size, generator=g)
    level = torch.rand(b, generator=g)
    return z, cond, level


def test_build_network_and_shape():
    net = build_network({'type': 'SR3UNet', **SMALL})
    assert isinstance(net, SR3UNet)
    z, cond, level = inputs()
    out = net(z, cond, level)
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
    # attention placed at the 16x16 level (level 1), 1 down + 2 up + mid
    assert sum(isinstance(m, AttnBlock) for m in net.modules()) == 4


@torch.no_grad()
def test_output_depends_on_every_input():
    net = small().eval()
    z, cond, level = inputs()
    out = net(z, cond, level)
    assert not torch.allclose(out, net(z, cond, torch.full_like(level, 0.05)), atol=1e-5)
    assert not torch.allclose(out, net(z, cond, torch.full_like(level, 0.95)), atol=1e-5)
    assert not torch.allclose(out, net(z, cond + 0.5, level), atol=1e-5)
    assert not torch.allclose(out, net(z + 0.5, cond, level), atol=1e-5)
    # each sample uses its own noise level
    level2 = level.clone()
    level2[1] = 1.0 - level2[1]
    out2 = net(z, cond, level2)
    assert torch.allclose(out[0], out2[0], atol=1e-6)
    assert not torch.allclose(out[1], out2[1], atol=1e-5)


def test_gradients_reach_every_parameter():
    net = small()
    z, cond, level = inputs()
    net(z, cond, level).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_checkpoint_matches_plain():
    z, cond, level = inputs()
    results = []
    for use_checkpoint in (False, True):
        net = small(use_checkpoint=use_checkpoint).train()  # checkpointing is active in training only
        out = net(z, cond, level)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n


def test_checkpoint_with_dropout_matches_plain():
    # Non-reentrant checkpoint restores the RNG state: same dropout masks on recompute.
    z, cond, level = inputs()
    results = []
    for use_checkpoint in (False, True):
        net = small(use_checkpoint=use_checkpoint, dropout=0.3).train()
        torch.manual_seed(123)
        out = net(z, cond, level)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for ga, gb in zip(results[0][1], results[1][1]):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_other_input_size():
    net = small().eval()
    z, cond, level = inputs(b=1, size=48)
    assert net(z, cond, level).shape == (1, 3, 48, 48)
    z = torch.randn(1, 3, 32, 48)
    assert net(z, torch.randn_like(z), level).shape == (1, 3, 32, 48)


@pytest.mark.parametrize('kw, words', [
    (dict(norm_groups=32), ['norm_groups=32', '16', 'channel_mults[0]']),
    (dict(base_channels=16, channel_mults=(3, 2), norm_groups=32), ['norm_groups=32', '48', 'channel_mults[0]']),
    (dict(base_channels=16, channel_mults=(2, 4), norm_groups=32), ['norm_groups=32', 'base_channels']),
    (dict(channel_mults=()), ['channel_mults']),
    (dict(channel_mults=(1, 0)), ['channel_mults']),
    (dict(channel_mults=(1, 2.0)), ['channel_mults']),
    (dict(num_res_blocks=0), ['num_res_blocks']),
    (dict(base_channels=15, norm_groups=5), ['base_channels']),
    (dict(dropout=1.0), ['dropout']),
    (dict(attn_resolutions=(12, )), ['attn_resolutions', '12']),
    (dict(image_size=33), ['image_size']),
    (dict(use_checkpoint='yes'), ['use_checkpoint']),
])
def test_invalid_options(kw, words):
    with pytest.raises(ValueError) as info:
        SR3UNet(**{**SMALL, **kw})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_invalid_options_through_build_network():
    with pytest.raises(ValueError, match='num_res_blocks'):
        build_network({'type': 'SR3UNet', **SMALL, 'num_res_blocks': 0})


@torch.no_grad()
def test_invalid_inputs():
    net = small().eval()
    z, cond, level = inputs()
    with pytest.raises(ValueError, match='31x32'):
        net(z[..., :31, :], cond[..., :31, :], level)
    deep = small(channel_mults=(1, 2, 2)).eval()  # needs sizes divisible by 4
    with pytest.raises(ValueError, match='32x30'):
        deep(z[..., :30], cond[..., :30], level)
    with pytest.raises(ValueError, match='cond'):
        net(z, cond[:1], level)
    with pytest.raises(ValueError, match='cond'):
        net(z, cond[..., :16], level)
    with pytest.raises(ValueError, match='in_channels'):
        net(z, cond[:, :1], level)
    with pytest.raises(ValueError, match=r'noise_level.*\(2, 1\)'):
        net(z, cond, level[:, None])
    with pytest.raises(ValueError, match='noise_level'):
        net(z, cond, level[:1])
    with pytest.raises(ValueError, match='noise_level'):
        net(z, cond, torch.tensor(0.5))


def test_paper_config_parameter_count():
    net = SR3UNet()
    n = sum(p.numel() for p in net.parameters())
    print(f'SR3UNet() paper configuration: {n:,} parameters')
    assert abs(n - PAPER_PARAMS) <= 0.01 * PAPER_PARAMS, n
    # 8 attention blocks at 512 channels: level 3 (16x16 at image_size=128), 3 down + 4 up, plus the middle.
    attn = [m for m in net.modules() if isinstance(m, AttnBlock)]
    assert len(attn) == 8 and all(m.qkv.in_channels == 512 for m in attn)
