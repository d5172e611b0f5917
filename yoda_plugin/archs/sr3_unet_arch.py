"""SR3 denoising U-Net (Saharia et al., "Image Super-Resolution via Iterative
Refinement", 2021) with the residual blocks of DDPM (Ho et al., 2020).

YODA uses this network as its noise predictor: "three ResBlocks, an initial
channel size of 64, channel multiplier [1, 2, 4, 8, 8], GroupNorm with 32
groups". Those are this module's defaults.

Design, with the paper facts it follows:

* Conditioning on the LR image (SR3): the bicubic-upsampled LR image ``cond``
  is concatenated with the noisy image ``z_t`` along channels, so the input
  has ``cond`` + ``z_t`` channels (3 + 3 = 6 by default).
* Conditioning on the noise level (SR3): the network sees the continuous noise
  level sqrt(gamma) in [0, 1] rather than an integer time step, so one trained
  net serves any noise schedule / number of sampling steps. The scalar is
  encoded with the transformer sinusoids (frequencies 10000^(-i/half)) applied
  to the raw value, as SR3 does, then passed through an MLP
  ``Linear(C, 4C) -> SiLU -> Linear(4C, C)``. Because the level lies in
  [0, 1], the low-frequency channels of the encoding vary little; the MLP
  learns to use the high-frequency ones. No rescaling constant is applied.
* ResBlock (DDPM): GroupNorm -> SiLU -> Conv3x3 -> + Linear(SiLU(emb)) ->
  GroupNorm -> SiLU -> Dropout -> Conv3x3, with a 1x1 conv on the skip path
  when the channel count changes. The embedding is *added* per channel
  (DDPM), no scale/shift FiLM.
* Self-attention (DDPM): single head, 1x1 qkv and output convs, residual, at
  the levels whose resolution (``image_size / 2**level`` of the constructor's
  ``image_size``) is listed in ``attn_resolutions``, and in the middle block.
  The layers depend only on constructor options, never on the input size, so
  a net trained on 128x128 crops runs unchanged on full test images.
* U-Net (DDPM): stride-2 Conv3x3 down, nearest x2 + Conv3x3 up; every down
  feature (input conv, each ResBlock, each downsample) is stored and consumed
  by one of the ``num_res_blocks + 1`` ResBlocks per level on the way up.
* Weights use PyTorch's default initialisation (no zero-init of the output
  convs as in DDPM's TensorFlow code), so a fresh net already responds to all
  of its inputs.

Three options (defaults: the design above) make the net the U-Net of the
public SR3 code the paper built on (Janspiry/Image-Super-Resolution-via-
Iterative-Refinement), whose published checkpoints
:mod:`yoda_plugin.checkpoints` converts: ``noise_proj_silu: false`` (its
per-block noise projection is a Linear on the embedding, no SiLU before it),
``attn_qkv_bias: false`` (its qkv conv has no bias) and ``noise_affine: true``
(the scale-and-shift conditioning of its older revision, ``use_affine_level``:
the projection gives 2C values, gamma then beta, and the block computes
``(1 + gamma) * h + beta`` instead of ``h + e``).
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from basicsr.utils.registry import ARCH_REGISTRY


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def noise_level_encoding(noise_level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding (B,) -> (B, dim) of the raw noise level sqrt(gamma).

    Frequencies are exp(-ln(10000) * i / half), i = 0..half-1; sines and
    cosines are concatenated. Computed in float32 for accuracy.
    """
    half = dim // 2
    i = torch.arange(half, device=noise_level.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * i / half)
    args = noise_level.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """DDPM residual block with noise-level conditioning: added per channel, or scale-and-shift (``affine``)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int,
                 proj_silu: bool = True, affine: bool = False):
        super().__init__()
        self.proj_silu, self.affine = proj_silu, affine
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if affine else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # DDPM: nonlinearity then a dense projection, added per channel (the public SR3 code: no nonlinearity).
        e = self.emb_proj(F.silu(emb) if self.proj_silu else emb)[:, :, None, None]
        if self.affine:
            gamma, beta = e.chunk(2, dim=1)
            h = (1 + gamma) * h + beta
        else:
            h = h + e
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (DDPM)."""

    def __init__(self, ch: int, groups: int, qkv_bias: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        # (B, 1 head, HW, C); scaled_dot_product_attention uses 1/sqrt(C) and
        # picks a memory-efficient kernel where one exists.
        q, k, v = (t.transpose(1, 2)[:, None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


@ARCH_REGISTRY.register()
class SR3UNet(nn.Module):
    """SR3 noise-prediction U-Net, ``forward(z_t, cond, noise_level) -> eps``.

    Args:
        in_channels: channels of ``cat([cond, z_t])`` (6 for RGB).
        out_channels: channels of the predicted noise (3 for RGB).
        base_channels: channels of the first level (paper: 64); also the
            width of the noise-level embedding. Must be even.
        channel_mults: per-level channel multipliers (paper: 1, 2, 4, 8, 8).
            ``len(channel_mults) - 1`` downsamplings, so input H and W must be
            divisible by ``2**(len(channel_mults) - 1)`` (16 by default).
        num_res_blocks: ResBlocks per level on the way down (paper: 3); the
            way up has one more per level.
        attn_resolutions: feature resolutions, computed from ``image_size``,
            that get self-attention after each ResBlock. Every entry must be
            the resolution of some level.
        image_size: training crop size used only to place attention layers.
        dropout: dropout in the ResBlocks.
        norm_groups: GroupNorm groups (paper: 32); must divide every channel
            count.
        use_checkpoint: gradient-checkpoint each ResBlock and attention block
            while training (recompute activations in backward to save memory).
        noise_proj_silu: SiLU on the embedding before each ResBlock's noise
            projection (DDPM; default). false: the public SR3 code's plain
            Linear.
        attn_qkv_bias: bias in the attention's qkv conv (default). false: as
            the public SR3 code.
        noise_affine: scale-and-shift noise conditioning ``(1 + gamma) * h +
            beta`` (the public SR3 code's older ``use_affine_level``
            revision); default false: ``h + e``.

    ``network_options`` holds the constructor arguments (checkpoint loading
    compares them with a file's layout).

    Size of the paper configuration (all defaults): 128,817,731 parameters,
    measured, which matches the "about 129M" quoted for the paper's SR3 net.
    With image_size=128, attn_resolutions=(16,) puts attention on level 3
    (512 channels): 7 blocks (3 down, 4 up) plus the middle one, 1,051,648
    parameters each. Without them the net has 121,456,195 parameters and with
    (8, 16) 136,179,267, so the 129M figure agrees with one attended level of
    512 channels; attention at 8 instead of 16 would give the same count
    (level 4 also has 512 channels), so the count cannot tell those apart.
    """

    def __init__(self,
                 in_channels: int = 6,
                 out_channels: int = 3,
                 base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 4, 8, 8),
                 num_res_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, ),
                 image_size: int = 128,
                 dropout: float = 0.0,
                 norm_groups: int = 32,
                 use_checkpoint: bool = False,
                 noise_proj_silu: bool = True,
                 attn_qkv_bias: bool = True,
                 noise_affine: bool = False):
        super().__init__()
        self._validate(in_channels, out_channels, base_channels, channel_mults, num_res_blocks, attn_resolutions,
                       image_size, dropout, norm_groups, use_checkpoint)
        for name, value in (('noise_proj_silu', noise_proj_silu), ('attn_qkv_bias', attn_qkv_bias),
                            ('noise_affine', noise_affine)):
            if not isinstance(value, bool):
                raise ValueError(f'network_g.{name} must be true or false, got {value!r}')
        channel_mults = tuple(channel_mults)
        attn_resolutions = tuple(attn_resolutions)
        self.network_options = dict(
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
            channel_mults=list(channel_mults), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
            image_size=image_size, dropout=dropout, norm_groups=norm_groups, use_checkpoint=use_checkpoint,
            noise_proj_silu=noise_proj_silu, attn_qkv_bias=attn_qkv_bias, noise_affine=noise_affine)
        res_block = lambda i, o: ResBlock(i, o, emb_dim, dropout, norm_groups, noise_proj_silu,  # noqa: E731
                                          noise_affine)
        attn_block = lambda c: AttnBlock(c, norm_groups, attn_qkv_bias)  # noqa: E731
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.num_levels = len(channel_mults)
        self.use_checkpoint = use_checkpoint
        emb_dim = base_channels

        # SR3: MLP on the sinusoidal encoding of sqrt(gamma).
        self.noise_mlp = nn.Sequential(
            nn.Linear(base_channels, 4 * base_channels), nn.SiLU(), nn.Linear(4 * base_channels, emb_dim))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path. ``skip_chs`` records the channels of every stored feature.
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            res = image_size // 2**level
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(res_block(ch, out_ch))
                ch = out_ch
                if res in attn_resolutions:
                    self.down.append(attn_block(ch))
                skip_chs.append(ch)
            if level != self.num_levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([
            res_block(ch, ch),
            attn_block(ch),
            res_block(ch, ch),
        ])

        # Up path: num_res_blocks + 1 ResBlocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            res = image_size // 2**level
            out_ch = base_channels * channel_mults[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(res_block(ch + skip_chs.pop(), out_ch))
                ch = out_ch
                if res in attn_resolutions:
                    self.up.append(attn_block(ch))
            if level != 0:
                self.up.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @staticmethod
    def _validate(in_channels, out_channels, base_channels, channel_mults, num_res_blocks, attn_resolutions,
                  image_size, dropout, norm_groups, use_checkpoint):
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels),
                            ('base_channels', base_channels), ('image_size', image_size),
                            ('norm_groups', norm_groups)):
            if not _is_int(value) or value < 1:
                raise ValueError(f'network_g.{name} must be a positive integer, got {value!r}')
        if base_channels % 2:
            raise ValueError(f'network_g.base_channels must be even (it is also the width of the sinusoidal '
                             f'noise-level encoding), got {base_channels}')
        if (isinstance(channel_mults, (str, bytes)) or not isinstance(channel_mults, Sequence)
                or len(channel_mults) == 0 or not all(_is_int(m) and m >= 1 for m in channel_mults)):
            raise ValueError(f'network_g.channel_mults must be a non-empty list of positive integers, '
                             f'got {channel_mults!r}')
        if not _is_int(num_res_blocks) or num_res_blocks < 1:
            raise ValueError(f'network_g.num_res_blocks must be an integer >= 1, got {num_res_blocks!r}')
        if (isinstance(attn_resolutions, (str, bytes)) or not isinstance(attn_resolutions, Sequence)
                or not all(_is_int(r) and r >= 1 for r in attn_resolutions)):
            raise ValueError(f'network_g.attn_resolutions must be a list of positive integers, '
                             f'got {attn_resolutions!r}')
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f'network_g.dropout must be a number in [0, 1), got {dropout!r}')
        if not isinstance(use_checkpoint, bool):
            raise ValueError(f'network_g.use_checkpoint must be true or false, got {use_checkpoint!r}')
        # GroupNorm sees base_channels (first ResBlock) and every level's width;
        # up-path concatenations are sums of these, so they follow.
        for i, m in enumerate(channel_mults):
            if (base_channels * m) % norm_groups:
                raise ValueError(f'network_g.norm_groups={norm_groups} does not divide channels '
                                 f'{base_channels * m} (base_channels * channel_mults[{i}] = '
                                 f'{base_channels} * {m})')
        if base_channels % norm_groups:
            raise ValueError(f'network_g.norm_groups={norm_groups} does not divide channels {base_channels} '
                             f'(base_channels)')
        factor = 2**(len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f'network_g.image_size={image_size} must be divisible by {factor} '
                             f'(2**(len(channel_mults) - 1))')
        level_res = [image_size // 2**level for level in range(len(channel_mults))]
        unused = [r for r in attn_resolutions if r not in level_res]
        if unused:
            # Silently dropping attention would change the model unnoticed.
            raise ValueError(f'network_g.attn_resolutions {unused} match no level: with image_size={image_size} '
                             f'the level resolutions are {level_res}')

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpoint: works with inputs that need no grad and
            # restores the RNG state, so dropout masks match on recompute.
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, z_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        self._check_inputs(z_t, cond, noise_level)
        enc = noise_level_encoding(noise_level, self.base_channels).to(self.conv_in.weight.dtype)
        emb = self.noise_mlp(enc)

        h = self.conv_in(torch.cat([cond, z_t], dim=1))
        skips = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
                skips.append(h)
            elif isinstance(block, AttnBlock):
                h = self._run(block, h, emb)
                skips[-1] = h  # the stored feature is the one after attention
            else:
                h = self._run(block, h, emb)
                skips.append(h)

        for block in self.mid:
            h = self._run(block, h, emb)

        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            elif isinstance(block, AttnBlock):
                h = self._run(block, h, emb)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, z_t: torch.Tensor, cond: torch.Tensor, noise_level: torch.Tensor) -> None:
        if z_t.dim() != 4 or cond.dim() != 4:
            raise ValueError(f'SR3UNet expects 4-D z_t and cond (B, C, H, W), got z_t {tuple(z_t.shape)} '
                             f'and cond {tuple(cond.shape)}')
        if z_t.shape[0] != cond.shape[0] or z_t.shape[2:] != cond.shape[2:]:
            raise ValueError(f'SR3UNet: z_t {tuple(z_t.shape)} and cond {tuple(cond.shape)} must have the same '
                             f'batch size and spatial size')
        if z_t.shape[1] + cond.shape[1] != self.in_channels:
            raise ValueError(f'SR3UNet: cond channels {cond.shape[1]} + z_t channels {z_t.shape[1]} != '
                             f'network_g.in_channels={self.in_channels}')
        b, _, h, w = z_t.shape
        factor = 2**(self.num_levels - 1)
        if h % factor or w % factor:
            raise ValueError(f'SR3UNet: input size {h}x{w} is not divisible by {factor} '
                             f'(2**(len(channel_mults) - 1)); pad or crop the image')
        if not torch.is_tensor(noise_level) or tuple(noise_level.shape) != (b, ):
            shape = tuple(noise_level.shape) if torch.is_tensor(noise_level) else type(noise_level).__name__
            raise ValueError(f'SR3UNet: noise_level must be a tensor of shape ({b},) holding sqrt(gamma) per '
                             f'sample, got {shape}')
