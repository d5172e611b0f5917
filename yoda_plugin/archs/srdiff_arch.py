"""SRDiff network (Li et al., "SRDiff: Single image super-resolution with
diffusion probabilistic models", Neurocomputing 2022): a pretrained RRDB LR
encoder plus a conditional noise-prediction U-Net on the HR residual.

What we follow from SRDiff's design (official code, LeiaLi/SRDiff), and where
we differ:

* LR encoder: the trunk of an RRDBNet (ESRGAN). We build BasicSR's own
  ``RRDBNet`` (``basicsr.archs.rrdbnet_arch``) inside the network, so a
  checkpoint written by BasicSR's ``SRModel`` for ``type: RRDBNet`` loads into
  ``net.rrdb`` key for key. The encoder returns the intermediate features
  ``[RRDB_1(f), ..., RRDB_n(f), f + conv_body(RRDB_n(...))]`` (``n + 1`` maps,
  f = conv_first(LR)), the list SRDiff collects, and SRDiff keeps every third
  one starting at index 2 (``feas[2::3]``: for n = 8 the outputs of blocks 3
  and 6 and the final trunk feature); ``cond_feature_indices`` picks others.
  SRDiff's sizes are the defaults: 8 blocks, 32 features, growth 16. The RRDB
  head (``conv_up1/2``, ``conv_hr``, ``conv_last``) is kept only so the
  checkpoint loads strictly; the diffusion model never runs it.
  BasicSR's RRDBNet takes LR in [0, 1] (SRDiff's own copy mapped its [-1, 1]
  input to [0, 1] first: the same thing).
* Conditioning: the selected features are concatenated along channels and
  projected *and* upsampled to the HR grid by one transposed convolution
  (kernel 2f, stride f, padding f/2, f = 4: BasicSR's RRDBNet trunk always
  runs at HR/4, pixel-unshuffling x2 and x1 inputs), then *added* to the
  U-Net's full-resolution features after the first level's ResBlocks
  (SRDiff's ``x = x + cond`` at ``i == 0``).
* Time: the integer time step t (we pass the training step 1..T of the
  paper's notation; SRDiff's 0-based t is ours minus 1, a shift that does not
  matter when training from scratch) with SRDiff's sinusoidal embedding
  (frequencies 10000^(-i/(half-1))), then ``Linear(C, 4C) -> Mish ->
  Linear(4C, C)``. ``time_offset`` is added to t before the embedding: -1
  gives SRDiff's 0..T-1, which its published checkpoints were trained on
  (:mod:`yoda_plugin.checkpoints` converts them).
* ResBlock: ``Block -> + Linear(Mish(emb)) -> Block -> + skip`` where
  ``Block = ReflectionPad(1) -> Conv3x3 [-> GroupNorm] -> Mish`` and the skip
  is a 1x1 conv when channels change. SRDiff uses no normalisation
  (``norm_groups: 0``, the default); ``norm_groups > 0`` adds GroupNorm.
* U-Net: channels ``base * mults`` (SRDiff / YODA supplement: 64 and
  [1, 2, 2, 4]), ``num_res_blocks`` (SRDiff: 2) per level, downsampling by a
  reflection-padded stride-2 conv, upsampling by a 4x4 stride-2 transposed
  conv, as SRDiff. Like SRDiff, the up path consumes the skips of levels
  L-1..1 only: the full-resolution (level 0) features reach the output
  through the down/up path, not through a skip. The middle block has an
  optional SRDiff linear attention (``use_attn``, off in SRDiff's DIV2K
  setup) with a ReZero gate initialised to 0. Output: ``Block(C, C) ->
  Conv1x1`` to 3 channels (the predicted noise).
* Not taken over: SRDiff's optional weight norm / custom init (off in its
  configs), the ``up_input`` branch (off), the auxiliary RRDB L1 loss (only
  used when the encoder is trained jointly).

Non-local parts, which matter for tiled sampling: the U-Net has no
normalisation by default, but its receptive field is large (3 downsamplings),
GroupNorm (``norm_groups > 0``) normalises over the whole input and linear
attention (``use_attn``) mixes all positions; tiles therefore approximate
whole-image sampling. The condition projection is local and
:meth:`SRDiffNet.project_condition` computes it exactly per tile.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from basicsr.archs.arch_util import pixel_unshuffle
from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.utils.registry import ARCH_REGISTRY

# BasicSR's RRDBNet trunk runs at HR / 4 for scale 4 (LR grid), 2 (LR
# pixel-unshuffled by 2) and 1 (by 4).
RRDB_FEATURE_STRIDE = 4
RRDB_HEAD = ('conv_up1', 'conv_up2', 'conv_hr', 'conv_last')


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """SRDiff's sinusoidal embedding of integer time steps (B,) -> (B, dim), float32."""
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ConvBlock(nn.Module):
    """ReflectionPad(1) -> Conv3x3 [-> GroupNorm] -> Mish (SRDiff's ``Block``)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(in_ch, out_ch, 3)
        self.norm = nn.GroupNorm(groups, out_ch) if groups > 0 else nn.Identity()
        self.act = nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(self.pad(x))))


class TimeResBlock(nn.Module):
    """SRDiff's ResnetBlock: the time embedding is added between the two blocks."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.block1 = ConvBlock(in_ch, out_ch, groups)
        self.emb_proj = nn.Sequential(nn.Mish(), nn.Linear(emb_dim, out_ch))
        self.block2 = ConvBlock(out_ch, out_ch, groups)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.emb_proj(emb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class LinearAttention(nn.Module):
    """Linear attention (softmax over key positions), ReZero-gated residual, as SRDiff's middle block."""

    def __init__(self, ch: int, heads: int, head_ch: int):
        super().__init__()
        self.heads, self.head_ch = heads, head_ch
        self.qkv = nn.Conv2d(ch, 3 * heads * head_ch, 1, bias=False)
        self.out = nn.Conv2d(heads * head_ch, ch, 1)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, self.head_ch, h * w).unbind(1)
        context = torch.einsum('bhdn,bhen->bhde', k.softmax(dim=-1), v)
        out = torch.einsum('bhde,bhdn->bhen', context, q).reshape(b, self.heads * self.head_ch, h, w)
        return x + self.gate * self.out(out)


class Downsample(nn.Module):

    def __init__(self, ch: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class SRDiffUNet(nn.Module):
    """SRDiff's conditional noise-prediction U-Net: ``forward(z_t, t, cond_hr) -> eps``.

    ``cond_hr`` (B, base_channels * channel_mults[0], H, W) is added after the first level's
    ResBlocks; ``t`` holds integer time steps (B,).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2, norm_groups: int = 0,
                 use_attn: bool = False, attn_heads: int = 4, attn_head_channels: int = 32):
        super().__init__()
        self.base_channels = base_channels
        self.num_levels = len(channel_mults)
        dims = [in_channels] + [base_channels * m for m in channel_mults]
        emb = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(emb, 4 * emb), nn.Mish(), nn.Linear(4 * emb, emb))

        self.downs = nn.ModuleList()
        for level, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks = nn.ModuleList([TimeResBlock(d_in if i == 0 else d_out, d_out, emb, norm_groups)
                                    for i in range(num_res_blocks)])
            down = Downsample(d_out) if level < self.num_levels - 1 else nn.Identity()
            self.downs.append(nn.ModuleList([blocks, down]))

        mid = dims[-1]
        self.mid1 = TimeResBlock(mid, mid, emb, norm_groups)
        self.mid_attn = LinearAttention(mid, attn_heads, attn_head_channels) if use_attn else None
        self.mid2 = TimeResBlock(mid, mid, emb, norm_groups)

        # Up path over levels L-1..1 (SRDiff: reversed(in_out[1:])), each ending in a x2 upsampling.
        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(list(zip(dims[1:-1], dims[2:]))):
            blocks = nn.ModuleList([TimeResBlock(2 * d_out if i == 0 else d_in, d_in, emb, norm_groups)
                                    for i in range(num_res_blocks)])
            self.ups.append(nn.ModuleList([blocks, nn.ConvTranspose2d(d_in, d_in, 4, 2, 1)]))

        self.final = nn.Sequential(ConvBlock(base_channels * channel_mults[0], base_channels, norm_groups),
                                   nn.Conv2d(base_channels, out_channels, 1))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond_hr: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(z_t.dtype))
        x = z_t
        skips = []
        for level, (blocks, down) in enumerate(self.downs):
            for block in blocks:
                x = block(x, emb)
            if level == 0:
                x = x + cond_hr  # SRDiff: the LR condition joins the full-resolution features here
            else:
                skips.append(x)  # the up path never uses the level-0 skip (SRDiff): do not keep it alive
            x = down(x)
        x = self.mid1(x, emb)
        if self.mid_attn is not None:
            x = self.mid_attn(x)
        x = self.mid2(x, emb)
        for blocks, up in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            for block in blocks:
                x = block(x, emb)
            x = up(x)
        return self.final(x)


@ARCH_REGISTRY.register()
class SRDiffNet(nn.Module):
    """RRDB LR encoder + conditional U-Net: ``forward(z_t, lq, t) -> eps``.

    Args:
        scale: SR factor (1, 2 or 4: BasicSR's RRDBNet); must equal the
            option file's top-level ``scale``.
        num_in_ch / num_out_ch: image channels (RGB: 3).
        rrdb_num_feat / rrdb_num_block / rrdb_num_grow_ch: the encoder,
            BasicSR's RRDBNet ``num_feat`` / ``num_block`` / ``num_grow_ch``
            (SRDiff: 32, 8, 16). Must match the pretrained checkpoint.
        cond_feature_indices: which of the ``rrdb_num_block + 1`` encoder
            features condition the U-Net; null: SRDiff's every third from
            index 2 (``feas[2::3]``).
        base_channels / channel_mults / num_res_blocks: the U-Net (SRDiff /
            YODA supplement: 64, [1, 2, 2, 4], 2).
        norm_groups: GroupNorm groups in the U-Net blocks, 0 = none (SRDiff).
        use_attn / attn_heads / attn_head_channels: SRDiff's optional linear
            attention in the middle block (off for DIV2K in SRDiff).
        time_offset: integer added to the time step before its embedding
            (default 0: the net sees the training steps 1..T; -1: 0..T-1, as
            the official SRDiff code, for its published weights). Training
            and sampling both go through it, so a fine-tune keeps the
            convention of the weights it starts from.

    ``network_options`` holds the constructor arguments (checkpoint loading
    compares them with a file's layout).

    HR inputs must have sizes divisible by :attr:`size_multiple`
    (lcm of 2**(len(channel_mults) - 1) and the encoder stride 4); the model
    pads whole images and aligns tiles to it.
    """

    def __init__(self,
                 scale: int = 4,
                 num_in_ch: int = 3,
                 num_out_ch: int = 3,
                 rrdb_num_feat: int = 32,
                 rrdb_num_block: int = 8,
                 rrdb_num_grow_ch: int = 16,
                 cond_feature_indices: Optional[Sequence[int]] = None,
                 base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2, 4),
                 num_res_blocks: int = 2,
                 norm_groups: int = 0,
                 use_attn: bool = False,
                 attn_heads: int = 4,
                 attn_head_channels: int = 32,
                 time_offset: int = 0):
        super().__init__()
        if not _is_int(time_offset):
            raise ValueError(f'network_g.time_offset must be an integer (SRDiff\'s published weights: -1), '
                             f'got {time_offset!r}')
        self.network_options = dict(
            scale=scale, num_in_ch=num_in_ch, num_out_ch=num_out_ch, rrdb_num_feat=rrdb_num_feat,
            rrdb_num_block=rrdb_num_block, rrdb_num_grow_ch=rrdb_num_grow_ch,
            cond_feature_indices=None if cond_feature_indices is None else list(cond_feature_indices),
            base_channels=base_channels, channel_mults=list(channel_mults) if isinstance(channel_mults, Sequence)
            else channel_mults, num_res_blocks=num_res_blocks, norm_groups=norm_groups, use_attn=use_attn,
            attn_heads=attn_heads, attn_head_channels=attn_head_channels, time_offset=time_offset)
        if scale not in (1, 2, 4):
            raise ValueError(f'network_g.scale must be 1, 2 or 4 (BasicSR\'s RRDBNet encoder), got {scale!r}')
        for name, value in (('num_in_ch', num_in_ch), ('num_out_ch', num_out_ch), ('rrdb_num_feat', rrdb_num_feat),
                            ('rrdb_num_block', rrdb_num_block), ('rrdb_num_grow_ch', rrdb_num_grow_ch),
                            ('base_channels', base_channels), ('num_res_blocks', num_res_blocks),
                            ('attn_heads', attn_heads), ('attn_head_channels', attn_head_channels)):
            if not _is_int(value) or value < 1:
                raise ValueError(f'network_g.{name} must be a positive integer, got {value!r}')
        if base_channels % 2:
            raise ValueError(f'network_g.base_channels must be even (time-embedding width), got {base_channels}')
        if (isinstance(channel_mults, (str, bytes)) or not isinstance(channel_mults, Sequence)
                or len(channel_mults) < 2 or not all(_is_int(m) and m >= 1 for m in channel_mults)):
            raise ValueError(f'network_g.channel_mults must be a list of at least two positive integers, '
                             f'got {channel_mults!r}')
        if not _is_int(norm_groups) or norm_groups < 0:
            raise ValueError(f'network_g.norm_groups must be an integer >= 0 (0: no normalisation, as SRDiff), '
                             f'got {norm_groups!r}')
        if norm_groups:
            for ch in {base_channels * m for m in channel_mults} | {base_channels}:
                if ch % norm_groups:
                    raise ValueError(f'network_g.norm_groups={norm_groups} does not divide channel count {ch}')
        if not isinstance(use_attn, bool):
            raise ValueError(f'network_g.use_attn must be true or false, got {use_attn!r}')
        num_feats = rrdb_num_block + 1
        if cond_feature_indices is None:
            indices = list(range(2, num_feats, 3))
            if not indices:
                raise ValueError(f'rrdb_num_block={rrdb_num_block}: SRDiff\'s feature rule (every third from index '
                                 f'2) selects nothing; set network_g.cond_feature_indices')
        else:
            indices = list(cond_feature_indices)
            bad = [i for i in indices if not _is_int(i) or not 0 <= i < num_feats]
            if not indices or bad or len(set(indices)) != len(indices):
                raise ValueError(f'network_g.cond_feature_indices must be distinct integers in [0, {num_feats - 1}] '
                                 f'(rrdb_num_block + 1 encoder features), got {cond_feature_indices!r}')
        self.scale = scale
        self.time_offset = time_offset
        self.cond_feature_indices = tuple(indices)
        self.rrdb = RRDBNet(num_in_ch, num_out_ch, scale=scale, num_feat=rrdb_num_feat, num_block=rrdb_num_block,
                            num_grow_ch=rrdb_num_grow_ch)
        f = RRDB_FEATURE_STRIDE
        self.cond_proj = nn.ConvTranspose2d(rrdb_num_feat * len(indices), base_channels * channel_mults[0], 2 * f, f,
                                            f // 2)
        self.unet = SRDiffUNet(num_out_ch, num_out_ch, base_channels, channel_mults, num_res_blocks, norm_groups,
                               use_attn, attn_heads, attn_head_channels)
        unet_factor = 2**(len(channel_mults) - 1)
        self.size_multiple = unet_factor * f // math.gcd(unet_factor, f)

    # -- encoder -----------------------------------------------------------------------------------
    def encoder_parameters(self):
        """Parameters of the RRDB trunk that conditions the U-Net (the head is never run)."""
        return [p for n, p in self.rrdb.named_parameters() if n.split('.')[0] not in RRDB_HEAD]

    def rrdb_head_parameters(self):
        return [p for n, p in self.rrdb.named_parameters() if n.split('.')[0] in RRDB_HEAD]

    def encode(self, lq: torch.Tensor) -> List[torch.Tensor]:
        """Selected RRDB features of the LR image ``lq`` in [0, 1], each (B, rrdb_num_feat, H/4, W/4).

        Runs without autograd when no encoder parameter requires grad (frozen encoder).
        """
        if lq.dim() != 4:
            raise ValueError(f'SRDiffNet: lq must be (B, C, h, w), got {tuple(lq.shape)}')
        trainable = any(p.requires_grad for p in self.encoder_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            x = lq
            if self.scale in (1, 2):
                unshuffle = 4 // self.scale
                if lq.shape[2] % unshuffle or lq.shape[3] % unshuffle:
                    raise ValueError(f'SRDiffNet: for scale {self.scale} the LR size must be divisible by '
                                     f'{unshuffle}, got {tuple(lq.shape[2:])}')
                x = pixel_unshuffle(x, unshuffle)
            feat = self.rrdb.conv_first(x)
            feats, h = [], feat
            for block in self.rrdb.body:
                h = block(h)
                feats.append(h)
            feats.append(feat + self.rrdb.conv_body(h))
            return [feats[i] for i in self.cond_feature_indices]

    def project_condition(self, feats: List[torch.Tensor],
                          box: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
        """The HR condition map (B, base_channels * channel_mults[0], H, W), or its ``box = (top, bottom, left, right)``.

        A box must lie on the encoder grid (multiples of 4). The transposed
        convolution is local (an HR pixel depends on LR features within one
        pixel), so the box is computed from a feature crop with a margin of 2
        and equals the same region of the whole map.
        """
        cond = torch.cat(feats, dim=1)
        if box is None:
            return self.cond_proj(cond)
        f = RRDB_FEATURE_STRIDE
        top, bottom, left, right = box
        if any(v % f for v in box):
            raise ValueError(f'SRDiffNet: tile box {box} is not aligned to the encoder grid ({f})')
        h, w = cond.shape[2:]
        t0, b0, l0, r0 = top // f, bottom // f, left // f, right // f
        ct, cb, cl, cr = max(t0 - 2, 0), min(b0 + 2, h), max(l0 - 2, 0), min(r0 + 2, w)
        out = self.cond_proj(cond[:, :, ct:cb, cl:cr])
        oy, ox = (t0 - ct) * f, (l0 - cl) * f
        return out[:, :, oy:oy + bottom - top, ox:ox + right - left]

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond_hr: torch.Tensor) -> torch.Tensor:
        """Noise prediction given a precomputed HR condition (sampling: encode once, denoise T times)."""
        self._check(z_t, t)
        if cond_hr.shape[0] != z_t.shape[0] or cond_hr.shape[2:] != z_t.shape[2:]:
            raise ValueError(f'SRDiffNet: condition {tuple(cond_hr.shape)} does not match z_t {tuple(z_t.shape)}; '
                             f'the HR size must be {RRDB_FEATURE_STRIDE} x the encoder feature size')
        return self.unet(z_t, t + self.time_offset if self.time_offset else t, cond_hr)

    def forward(self, z_t: torch.Tensor, lq: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps for noisy residuals ``z_t`` (B, 3, H, W), LR images ``lq`` (B, 3, H/s, W/s) and steps ``t`` (B,)."""
        self._check(z_t, t)
        if (lq.shape[2] * self.scale, lq.shape[3] * self.scale) != tuple(z_t.shape[2:]):
            raise ValueError(f'SRDiffNet: LR {tuple(lq.shape)} x scale {self.scale} does not match z_t '
                             f'{tuple(z_t.shape)}')
        return self.denoise(z_t, t, self.project_condition(self.encode(lq)))

    def _check(self, z_t: torch.Tensor, t: torch.Tensor) -> None:
        if z_t.dim() != 4:
            raise ValueError(f'SRDiffNet: z_t must be (B, C, H, W), got {tuple(z_t.shape)}')
        h, w = z_t.shape[2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f'SRDiffNet: HR size {h}x{w} is not divisible by {self.size_multiple} (U-Net '
                             f'downsamplings and encoder stride); pad the image or use aligned tiles')
        if not torch.is_tensor(t) or tuple(t.shape) != (z_t.shape[0], ) or t.is_floating_point():
            raise ValueError(f'SRDiffNet: t must be an integer tensor of shape ({z_t.shape[0]},) (time steps), '
                             f'got {t.dtype if torch.is_tensor(t) else type(t).__name__} '
                             f'{tuple(t.shape) if torch.is_tensor(t) else ""}')

    # -- checkpoints -------------------------------------------------------------------------------
    def load_rrdb_state_dict(self, state: dict, strict: bool = True, source: str = 'checkpoint') -> List[str]:
        """Load a BasicSR ``RRDBNet`` state dict into the encoder; returns the keys loaded.

        Keys and shapes are checked first so a mismatch is an error that names
        the keys and the options to fix, not a bare PyTorch trace. With
        ``strict=False`` mismatching keys are skipped (and returned missing).
        """
        state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
        own = self.rrdb.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state)
                       if not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(own[k].shape))
        if strict and (missing or unexpected or shape):
            parts = []
            if missing:
                parts.append(f'{len(missing)} encoder key(s) missing from the file, e.g. {missing[:4]}')
            if unexpected:
                parts.append(f'{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}')
            if shape:
                parts.append('shape mismatch: ' + ', '.join(
                    f'{k} file {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__}'
                    f' vs net {tuple(own[k].shape)}' for k in shape[:4]))
            n_feat = self.rrdb.conv_first.out_channels
            raise ValueError(f'{source} does not fit the SRDiff RRDB encoder: {"; ".join(parts)}. network_g.'
                             f'rrdb_num_feat / rrdb_num_block / rrdb_num_grow_ch (now {n_feat} / {len(self.rrdb.body)}'
                             f' / {self.rrdb.body[0].rdb1.conv1.out_channels}) and scale must equal the pretrained '
                             f'RRDBNet\'s num_feat / num_block / num_grow_ch and scale')
        usable = {k: v for k, v in state.items() if k in own and k not in shape}
        self.rrdb.load_state_dict(usable, strict=strict)
        return sorted(usable)
