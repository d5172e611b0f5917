"""The published checkpoints of the SR3 and SRDiff code bases, read into our networks.

Two public layouts, recognised from their keys (:func:`detect_format`):

* ``janspiry-sr3``: Janspiry/Image-Super-Resolution-via-Iterative-Refinement
  (the SR3 code the YODA paper built on) saves the ``state_dict()`` of its
  ``GaussianDiffusion``: the U-Net under ``denoise_fn.*`` plus the schedule
  buffers (``betas``, ``alphas_cumprod``, ...), in files such as
  ``I640000_E37_gen.pth``. Its U-Net is our ``SR3UNet`` with
  ``noise_proj_silu: false`` and ``attn_qkv_bias: false``; files of its
  older revision (``use_affine_level``) hold a noise projection to 2C
  channels and need ``noise_affine: true`` (the *scale-shift* variant, told
  apart by the shape of ``denoise_fn.downs.1.res_block.noise_func.noise_func.0.weight``).
* ``srdiff``: LeiaLi/SRDiff saves ``{'global_step', 'optimizer_states',
  'state_dict': {'model': ...}}`` (``model_ckpt_steps_*.ckpt``) whose model
  holds ``denoise_fn.*`` (the U-Net), ``rrdb.*`` (the RRDB encoder, ESRGAN's
  key names) and the schedule buffers. It is our ``SRDiffNet`` with
  ``time_offset: -1`` (its time input is 0..T-1, ours 1..T).

What the weights do not tell is taken from the published configurations
(``config/sr_sr3_16_128.json``, ``config/sr_sr3_64_512.json``,
``configs/diffsr_df2k4x.yaml``) when the layout matches one, else from our
defaults, and said in :attr:`PublicCheckpoint.notes`: GroupNorm's group count
and the dropout rate (SR3), the attention placement's ``image_size`` (SR3).
The schedule comes from the file's ``betas`` buffer when it has one.

:func:`convert_checkpoint` writes a BasicSR checkpoint (``params`` and
``params_ema``) and returns the option blocks that build the matching network;
:func:`network_state_from_public` is what
:func:`yoda_plugin.checkpoints.loading.load_network_weights` uses to load the
original files directly through ``path.pretrain_network_g``.
"""
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..utils.torch_io import atomic_torch_save, load_checkpoint

JANSPIRY_SR3 = 'janspiry-sr3'
SRDIFF = 'srdiff'
FORMATS = (JANSPIRY_SR3, SRDIFF)

# Buffers of both code bases' GaussianDiffusion: the schedule, not network weights.
SCHEDULE_BUFFERS = frozenset({
    'betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
    'log_one_minus_alphas_cumprod', 'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
    'posterior_variance', 'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2'})

# Published SR3 configurations: (in_channels, base_channels, channel_mults, num_res_blocks, attended levels) ->
# (name, image_size, norm_groups, dropout). GroupNorm groups and dropout are not in the weights.
_SR3_PUBLISHED = {
    (6, 64, (1, 2, 4, 8, 8), 2, (3, )): ('SR3 16->128 faces (config/sr_sr3_16_128.json)', 128, 32, 0.2),
    (6, 64, (1, 2, 4, 8, 16), 1, ()): ('SR3 64->512 faces (config/sr_sr3_64_512.json)', 512, 16, 0.0),
}
_SR3_SCHEDULE = {'schedule': 'linear', 'num_timesteps': 2000, 'linear_start': 1.0e-6, 'linear_end': 1.0e-2}
_SRDIFF_SCHEDULE = {'schedule': 'cosine', 'cosine_s': 0.008, 'num_timesteps': 100}

# The published files the option files of options/pretrained/ expect, by file name: (what, where it is published,
# format). A missing one gets an error naming the file, where to get it and the command that converts it.
_JANSPIRY_README = ('https://github.com/Janspiry/Image-Super-Resolution-via-Iterative-Refinement, README '
                    '"Pretrained Model"')
PUBLISHED_FILES = {
    'I640000_E37_gen.pth': ('SR3 16->128 faces', f'{_JANSPIRY_README}, row 16x16 -> 128x128 (Google Drive or Baidu '
                                                 'Yun, code qwer), the *_gen.pth file', JANSPIRY_SR3),
    'sr3_64_512_gen.pth': ('SR3 64->512 faces', f'{_JANSPIRY_README}, row 64x64 -> 512x512, the *_gen.pth file',
                           JANSPIRY_SR3),
    'model_ckpt_steps_400000.ckpt': ('SRDiff 4x DIV2K', 'https://github.com/LeiaLi/SRDiff release v1.0.0, '
                                                        'srdiff_pretrained_div2k/model_ckpt_steps_400000.ckpt', SRDIFF),
}
# The folders docs/published-weights.md puts them in (a converted file there, e.g. basicsr.pth, is recognised too).
PUBLISHED_FOLDERS = {'sr3_16_128': 'I640000_E37_gen.pth', 'sr3_64_512': 'sr3_64_512_gen.pth',
                     'srdiff_pretrained_div2k': 'model_ckpt_steps_400000.ckpt'}


def missing_published_weights(path: str) -> Optional[FileNotFoundError]:
    """For a missing ``path`` that names a published file (or a file in its folder): the error that says which
    file it expects, where it is published and the command that converts it; None for any other path."""
    name = os.path.basename(path)
    folder = os.path.dirname(path)
    original = name if name in PUBLISHED_FILES else PUBLISHED_FOLDERS.get(os.path.basename(folder))
    if original is None:
        return None
    what, where, fmt = PUBLISHED_FILES[original]
    source = os.path.join(folder, original)
    converted = path if name != original else os.path.join(folder, 'basicsr.pth')
    return FileNotFoundError(
        f'checkpoint not found: {path}: it expects the published {what} weights, the file {original} from {where} '
        f'(nothing is downloaded); put it at {source} and load it as it is, or convert it once with: python '
        f'scripts/convert_checkpoint.py --format {fmt} {source} {converted} (docs/published-weights.md)')


_LABELS = {(JANSPIRY_SR3, 'additive'): 'Janspiry SR3 checkpoint (denoise_fn.*, additive noise conditioning)',
           (JANSPIRY_SR3, 'scale-shift'): 'Janspiry SR3 checkpoint (denoise_fn.*, scale-shift noise conditioning '
                                          'of the older use_affine_level revision)',
           (SRDIFF, 'official'): 'official SRDiff checkpoint (state_dict.model: denoise_fn.* and rrdb.*)'}


@dataclass
class PublicCheckpoint:
    """A published checkpoint read: its layout, its weights (their key names) and the options that fit it."""
    format: str
    variant: str
    state: Dict[str, torch.Tensor]
    network_g: dict
    diffusion: dict
    extra_sections: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    published: Optional[str] = None

    @property
    def label(self) -> str:
        return _LABELS[(self.format, self.variant)]

    def option_blocks(self) -> str:
        """The YAML sections to paste into an option file; ``network_g`` last."""
        blocks = [format_yaml_block('diffusion', self.diffusion)]
        blocks += [format_yaml_block(name, section) for name, section in self.extra_sections.items()]
        blocks.append(format_yaml_block('network_g', self.network_g))
        return '\n'.join(blocks)


# -- YAML ------------------------------------------------------------------------------------------------------

def _yaml_scalar(value) -> str:
    if value is None:
        return '~'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            text = repr(value)
            return text if ('.' in text or 'e' in text) else text + '.0'
        mantissa, exponent = f'{value:.6e}'.split('e')
        mantissa = mantissa.rstrip('0')
        mantissa += '0' if mantissa.endswith('.') else ''
        return f'{mantissa}e{int(exponent):+d}'  # PyYAML reads floats only with a dot and a signed exponent
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_yaml_scalar(v) for v in value) + ']'
    if isinstance(value, str) and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.]*', value):
        return value
    return repr(str(value))


def format_yaml_block(name: str, section: dict) -> str:
    """``name:`` and one indented ``key: value`` line per entry (lists in flow style), as our option files."""
    return '\n'.join([f'{name}:'] + [f'  {k}: {_yaml_scalar(v)}' for k, v in section.items()]) + '\n'


# -- detection -------------------------------------------------------------------------------------------------

def _strip_module(state: dict) -> 'OrderedDict[str, torch.Tensor]':
    return OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in state.items())


def _srdiff_model_state(obj) -> Optional[dict]:
    sd = obj.get('state_dict') if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        return None
    if isinstance(sd.get('model'), dict):
        return sd['model']
    flat = {k[6:]: v for k, v in sd.items() if isinstance(k, str) and k.startswith('model.')}  # SRDiff's load_ckpt
    return flat or None


def detect_format(obj) -> Optional[str]:
    """``'janspiry-sr3'``, ``'srdiff'``, ``'basicsr'`` (``params`` / ``params_ema``) or None (none of these)."""
    if not isinstance(obj, dict):
        return None
    model = _srdiff_model_state(obj)
    if model is not None and any(isinstance(k, str) and k.startswith(('denoise_fn.', 'rrdb.')) for k in model):
        return SRDIFF
    if 'params' in obj or 'params_ema' in obj:
        return 'basicsr'
    keys = [k[7:] if k.startswith('module.') else k for k in obj if isinstance(k, str)]
    if any(k.startswith('denoise_fn.noise_level_mlp.') for k in keys):
        return JANSPIRY_SR3
    if any(k.startswith('denoise_fn.') for k in keys) and any(k.startswith('rrdb.') for k in keys):
        return SRDIFF  # SRDiff's model state dict on its own
    return None


def _public_state(obj, fmt: str, source: str) -> 'OrderedDict[str, torch.Tensor]':
    state = _srdiff_model_state(obj) if fmt == SRDIFF else None
    state = _strip_module(state if state is not None else obj)
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f'{source}: the {fmt} weights hold non-tensor entries {bad[:4]}; expected a state dict')
    return state


# -- schedules -------------------------------------------------------------------------------------------------

def _schedule_from_buffers(state: dict, fallback: dict, notes: List[str]) -> dict:
    betas = state.get('betas')
    if betas is None or betas.dim() != 1 or betas.numel() < 2:
        notes.append(f'the file holds no schedule (betas) buffer: the published schedule {fallback} is assumed')
        return dict(fallback)
    from yoda_plugin.core.schedule import make_beta_schedule
    b = betas.double()
    T = b.numel()
    linear = torch.linspace(float(b[0]), float(b[-1]), T, dtype=torch.float64)
    if torch.allclose(b, linear, rtol=1e-4, atol=1e-9):
        return {'schedule': 'linear', 'num_timesteps': T, 'linear_start': float(f'{float(b[0]):.6g}'),
                'linear_end': float(f'{float(b[-1]):.6g}')}
    cosine = make_beta_schedule('cosine', T, cosine_s=0.008)
    if torch.allclose(b, cosine, rtol=1e-4, atol=1e-7):
        return {'schedule': 'cosine', 'cosine_s': 0.008, 'num_timesteps': T}
    notes.append(f'the file\'s betas ({T} steps, {float(b[0]):.3g}..{float(b[-1]):.3g}) are neither linear nor '
                 f'cosine (s = 0.008): set the diffusion section by hand; shown is the published {fallback}')
    return dict(fallback)


# -- Janspiry SR3 ----------------------------------------------------------------------------------------------

def _index_kinds(state: dict, prefix: str) -> Dict[int, str]:
    """For ``denoise_fn.<prefix>.<i>.*``: i -> 'res' (a ResnetBlocWithAttn), 'conv' (Down/Upsample) or 'plain'."""
    kinds = {}
    for key in state:
        m = re.match(rf'denoise_fn\.{prefix}\.(\d+)\.(.*)', key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            kind = 'res' if rest.startswith(('res_block.', 'attn.')) else 'conv' if rest.startswith('conv.') else \
                'plain'
            kinds[i] = kind if kinds.get(i, kind) == kind else 'mixed'
    return kinds


def _sr3_options(state: dict, source: str, image_size=None, norm_groups=None, dropout=None):
    need = ['denoise_fn.downs.0.weight', 'denoise_fn.noise_level_mlp.1.weight', 'denoise_fn.final_conv.block.3.weight']
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f'{source}: a Janspiry SR3 checkpoint needs {missing} (is it the *_gen.pth file, and of the '
                         f'"sr3" network, not "ddpm"?)')
    kinds = _index_kinds(state, 'downs')
    if sorted(kinds) != list(range(len(kinds))) or kinds.get(0) != 'plain' or 'mixed' in kinds.values():
        raise ValueError(f'{source}: unexpected denoise_fn.downs layout {kinds}')
    base = state['denoise_fn.downs.0.weight'].shape[0]
    levels, current = [], []
    for i in range(1, len(kinds)):
        if kinds[i] == 'res':
            current.append(i)
        else:
            levels.append(current)
            current = []
    levels.append(current)
    blocks_per_level = {len(level) for level in levels}
    if len(blocks_per_level) != 1 or 0 in blocks_per_level:
        raise ValueError(f'{source}: levels with different numbers of ResBlocks {[len(v) for v in levels]}: not an '
                         f'SR3 U-Net layout')
    mults, attn_levels = [], []
    for li, level in enumerate(levels):
        widths = {state[f'denoise_fn.downs.{i}.res_block.block1.block.3.weight'].shape[0] for i in level}
        attn = {f'denoise_fn.downs.{i}.attn.qkv.weight' in state for i in level}
        if len(widths) != 1 or len(attn) != 1 or next(iter(widths)) % base:
            raise ValueError(f'{source}: level {li} of denoise_fn.downs is not a uniform SR3 level')
        mults.append(next(iter(widths)) // base)
        if attn.pop():
            attn_levels.append(li)
    first = f'denoise_fn.downs.{levels[0][0]}.res_block.noise_func.noise_func.0.weight'
    proj_out = state[first].shape[0]
    if proj_out not in (base * mults[0], 2 * base * mults[0]):
        raise ValueError(f'{source}: {first} has {proj_out} outputs, expected {base * mults[0]} (additive) or '
                         f'{2 * base * mults[0]} (scale-shift)')
    affine = proj_out == 2 * base * mults[0]
    qkv_bias = any(k.endswith('attn.qkv.bias') for k in state)
    signature = (state['denoise_fn.downs.0.weight'].shape[1], base, tuple(mults), len(levels[0]), tuple(attn_levels))
    published = _SR3_PUBLISHED.get(signature)
    notes = []
    # The older (scale-shift) revision hard-coded GroupNorm(32).
    default_groups = 32 if affine else published[2] if published else 32
    if norm_groups is None:
        norm_groups = default_groups
        notes.append(f'norm_groups: {norm_groups} ' + ('(the scale-shift revision fixed GroupNorm to 32 groups)'
                     if affine else f'(as {published[0]})' if published else '(SR3\'s default)')
                     + ': GroupNorm groups cannot be read from the weights')
    if image_size is None:
        image_size = published[1] if published else 128
        while image_size % 2**(len(mults) - 1):
            image_size *= 2
    if dropout is None:
        dropout = published[3] if published else 0.0
    network_g = OrderedDict(
        type='SR3UNet', in_channels=signature[0], out_channels=state['denoise_fn.final_conv.block.3.weight'].shape[0],
        base_channels=base, channel_mults=mults, num_res_blocks=len(levels[0]),
        attn_resolutions=[image_size // 2**level for level in attn_levels], image_size=image_size,
        dropout=dropout, norm_groups=norm_groups, noise_proj_silu=False, attn_qkv_bias=qkv_bias,
        noise_affine=affine)
    return network_g, attn_levels, notes, published[0] if published else None


def _sr3_key_map(net) -> Dict[str, str]:
    """Our key -> the Janspiry key, for every tensor of the SR3UNet ``net`` (walked block by block)."""
    from yoda_plugin.archs.sr3_unet_arch import AttnBlock, Downsample, ResBlock, Upsample
    res_sub = {'norm1': 'block1.block.0', 'conv1': 'block1.block.3', 'emb_proj': 'noise_func.noise_func.0',
               'norm2': 'block2.block.0', 'conv2': 'block2.block.3', 'skip': 'res_conv'}
    blocks = {'noise_mlp.0': 'noise_level_mlp.1', 'noise_mlp.2': 'noise_level_mlp.3', 'conv_in': 'downs.0',
              'norm_out': 'final_conv.block.0', 'conv_out': 'final_conv.block.3'}
    subs = {}
    for ours, theirs, index in (('down', 'downs', 0), ('mid', 'mid', -1), ('up', 'ups', -1)):
        for j, block in enumerate(getattr(net, ours)):
            if isinstance(block, AttnBlock):  # their attention lives in the preceding ResnetBlocWithAttn
                blocks[f'{ours}.{j}'] = f'{theirs}.{index}.attn'
                subs[f'{ours}.{j}'] = {'proj': 'out'}
            elif isinstance(block, ResBlock):
                index += 1
                blocks[f'{ours}.{j}'] = f'{theirs}.{index}.res_block'
                subs[f'{ours}.{j}'] = res_sub
            elif isinstance(block, (Downsample, Upsample)):
                index += 1
                blocks[f'{ours}.{j}'] = f'{theirs}.{index}'
    mapping = {}
    for key in net.state_dict():
        parts = key.split('.')
        for n in (2, 1):
            head = '.'.join(parts[:n])
            if head in blocks:
                rest = parts[n:]
                sub = subs.get(head, {})
                if rest and rest[0] in sub:
                    rest = sub[rest[0]].split('.') + rest[1:]
                mapping[key] = 'denoise_fn.' + '.'.join([blocks[head]] + rest)
                break
        else:
            raise AssertionError(f'no Janspiry name for {key}')
    return mapping


# -- SRDiff ----------------------------------------------------------------------------------------------------

_SRDIFF_RES_SUB = (('block1.conv', 'block1.block.1'), ('block1.norm', 'block1.block.2'),
                   ('block2.conv', 'block2.block.1'), ('block2.norm', 'block2.block.2'),
                   ('emb_proj.1', 'mlp.1'), ('skip', 'res_conv'))
_SRDIFF_RRDB = (('body.', 'RRDB_trunk.'), ('conv_body', 'trunk_conv'), ('conv_up1', 'upconv1'),
                ('conv_up2', 'upconv2'), ('conv_hr', 'HRconv'))


def _srdiff_key(key: str) -> str:
    """Our SRDiffNet key -> the official SRDiff key."""
    if key.startswith('rrdb.'):
        rest = key[5:]
        for ours, theirs in _SRDIFF_RRDB:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        return 'rrdb.' + re.sub(r'\.rdb(\d)\.', r'.RDB\1.', rest)
    if key.startswith('cond_proj.'):
        return 'denoise_fn.' + key
    rest = key[len('unet.'):]

    def res(sub):
        for ours, theirs in _SRDIFF_RES_SUB:
            if sub.startswith(ours):
                return theirs + sub[len(ours):]
        raise AssertionError(f'no SRDiff name for {key}')
    m = re.fullmatch(r'(downs|ups)\.(\d+)\.0\.(\d+)\.(.*)', rest)
    if m:
        return f'denoise_fn.{m.group(1)}.{m.group(2)}.{m.group(3)}.{res(m.group(4))}'
    m = re.fullmatch(r'downs\.(\d+)\.1\.conv\.(.*)', rest)
    if m:
        return f'denoise_fn.downs.{m.group(1)}.2.conv.1.{m.group(2)}'
    m = re.fullmatch(r'ups\.(\d+)\.1\.(.*)', rest)
    if m:
        return f'denoise_fn.ups.{m.group(1)}.2.conv.0.{m.group(2)}'
    m = re.fullmatch(r'mid([12])\.(.*)', rest)
    if m:
        return f'denoise_fn.mid_block{m.group(1)}.{res(m.group(2))}'
    plain = {'mid_attn.qkv.weight': 'mid_attn.fn.fn.to_qkv.weight',
             'mid_attn.out.weight': 'mid_attn.fn.fn.to_out.weight',
             'mid_attn.out.bias': 'mid_attn.fn.fn.to_out.bias', 'mid_attn.gate': 'mid_attn.fn.g',
             'time_mlp.0.weight': 'mlp.0.weight', 'time_mlp.0.bias': 'mlp.0.bias',
             'time_mlp.2.weight': 'mlp.2.weight', 'time_mlp.2.bias': 'mlp.2.bias',
             'final.1.weight': 'final_conv.1.weight', 'final.1.bias': 'final_conv.1.bias'}
    if rest in plain:
        return 'denoise_fn.' + plain[rest]
    m = re.fullmatch(r'final\.0\.(conv|norm)\.(.*)', rest)
    if m:  # SRDiff's Block: ReflectionPad, Conv, [GroupNorm,] Mish
        return f'denoise_fn.final_conv.0.block.{1 if m.group(1) == "conv" else 2}.{m.group(2)}'
    raise AssertionError(f'no SRDiff name for {key}')


def _srdiff_options(state: dict, source: str):
    def need(key):
        if key not in state:
            raise ValueError(f'{source}: an SRDiff checkpoint needs {key} (SRDiff trained with use_rrdb: true?)')
        return state[key]
    unsupported = [k for k in state if k.endswith(('weight_g', 'weight_v')) or '.up_proj.' in k]
    if unsupported:
        raise ValueError(f'{source}: SRDiff options outside its published configurations (use_wn / up_input: keys '
                         f'{unsupported[:3]}) are not supported')
    if 'rrdb.upconv3.weight' in state:
        raise ValueError(f'{source}: an SRDiff x8 checkpoint (rrdb.upconv3); SRDiffNet represents the x4 layout only '
                         f'(BasicSR\'s RRDBNet has no x8 head)')
    kernel = need('denoise_fn.cond_proj.weight').shape[-1]
    if kernel != 8:
        raise ValueError(f'{source}: SRDiff cond_proj kernel {kernel} means scale {kernel // 2}; SRDiffNet represents '
                         f'the x4 layout only')
    if any('.block1.block.2.' in k for k in state):
        raise ValueError(f'{source}: an SRDiff U-Net with GroupNorm; the published SRDiff uses none (norm_groups: 0)')
    base = need('denoise_fn.mlp.0.weight').shape[1]
    mults, level = [], 0
    while f'denoise_fn.downs.{level}.0.block1.block.1.weight' in state:
        width = state[f'denoise_fn.downs.{level}.0.block1.block.1.weight'].shape[0]
        if width % base or f'denoise_fn.downs.{level}.1.block1.block.1.weight' not in state:
            raise ValueError(f'{source}: level {level} of denoise_fn.downs is not an SRDiff level')
        mults.append(width // base)
        level += 1
    if len(mults) < 2:
        raise ValueError(f'{source}: SRDiff U-Net with {len(mults)} level(s); expected at least 2')
    feat = need('rrdb.conv_first.weight')
    blocks = {int(m.group(1)) for k in state for m in [re.match(r'rrdb\.RRDB_trunk\.(\d+)\.', k)] if m}
    num_block = max(blocks) + 1 if blocks else 0
    use_attn = 'denoise_fn.mid_attn.fn.fn.to_qkv.weight' in state
    network_g = OrderedDict(
        type='SRDiffNet', scale=4, num_in_ch=feat.shape[1], num_out_ch=need('denoise_fn.final_conv.1.weight').shape[0],
        rrdb_num_feat=feat.shape[0], rrdb_num_block=num_block,
        rrdb_num_grow_ch=need('rrdb.RRDB_trunk.0.RDB1.conv1.weight').shape[0], cond_feature_indices=None,
        base_channels=base, channel_mults=mults, num_res_blocks=2, norm_groups=0, use_attn=use_attn)
    if use_attn:  # SRDiff's LinearAttention(dim): 4 heads
        qkv = state['denoise_fn.mid_attn.fn.fn.to_qkv.weight']
        network_g.update(attn_heads=4, attn_head_channels=qkv.shape[0] // 12)
    network_g['time_offset'] = -1
    published = None
    if mults == [1, 2, 3, 4] and base == 64 and not use_attn:
        published = 'SRDiff DIV2K/DF2K x4 (configs/diffsr_df2k4x.yaml)'
    return network_g, published


# -- reading and mapping ---------------------------------------------------------------------------------------

def read_public_checkpoint(obj, source: str, fmt: Optional[str] = None, image_size: Optional[int] = None,
                           norm_groups: Optional[int] = None, dropout: Optional[float] = None) -> PublicCheckpoint:
    """A loaded public checkpoint (``torch.load``'s result) with the options that build its network.

    ``fmt`` (None: detected) must be one of :data:`FORMATS`; ``image_size``, ``norm_groups``, ``dropout`` (SR3)
    replace what the weights cannot tell.
    """
    detected = detect_format(obj)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'unknown checkpoint format {fmt!r}; expected one of {FORMATS}')
    if detected not in FORMATS:
        keys = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        what = 'a BasicSR checkpoint (params / params_ema): load it as it is' if detected == 'basicsr' else \
            f'neither layout (top-level keys {keys})'
        raise ValueError(f'{source} is not a {fmt or " or ".join(FORMATS)} checkpoint: it is {what}')
    if fmt is not None and fmt != detected:
        raise ValueError(f'{source} is a {detected} checkpoint, not {fmt}: pass --format {detected}')
    state = _public_state(obj, detected, source)
    hints = {'image_size': image_size, 'norm_groups': norm_groups, 'dropout': dropout}
    layout = LAYOUTS[detected]
    network_g, variant, diffusion, extra, notes, published = layout.read(
        state, source, **{k: hints[k] for k in layout.option_hints})
    return PublicCheckpoint(detected, variant, state, network_g, diffusion, extra, notes, published)


def _read_sr3(state, source, image_size=None, norm_groups=None, dropout=None):
    network_g, _, notes, published = _sr3_options(state, source, image_size, norm_groups, dropout)
    variant = 'scale-shift' if network_g['noise_affine'] else 'additive'
    diffusion = _schedule_from_buffers(state, _SR3_SCHEDULE, notes)
    diffusion.update(sample_steps=diffusion['num_timesteps'], variance='posterior', clip_denoised=True,
                     continuous_noise_level=True)
    return network_g, variant, diffusion, {}, notes, published


def _read_srdiff(state, source):
    notes = []
    network_g, published = _srdiff_options(state, source)
    diffusion = _schedule_from_buffers(state, _SRDIFF_SCHEDULE, notes)
    diffusion.update(sample_steps=diffusion['num_timesteps'], variance='posterior', clip_denoised=True,
                     continuous_noise_level=False)
    extra = {'srdiff': OrderedDict(res_rescale=2.0, clip_input=True)}
    notes.append('srdiff: res_rescale 2.0 and clip_input true are SRDiff\'s published settings (not stored in '
                 'the file)')
    return network_g, 'official', diffusion, extra, notes, published


def _build_meta(network_g: dict):
    from yoda_plugin.archs.sr3_unet_arch import SR3UNet
    from yoda_plugin.archs.srdiff_arch import SRDiffNet
    cls = {'SR3UNet': SR3UNet, 'SRDiffNet': SRDiffNet}[network_g['type']]
    kwargs = {k: v for k, v in network_g.items() if k != 'type'}
    with torch.device('meta'):  # structure and shapes only, no memory or initialisation cost
        return cls(**kwargs)


def public_key_map(network_g: dict, fmt: str) -> 'OrderedDict[str, str]':
    """Our key -> the key in the public layout ``fmt``, for every tensor of the network ``network_g`` builds."""
    return OrderedDict(LAYOUTS[fmt].key_map(_build_meta(network_g)))


def network_state_from_public(ckpt: PublicCheckpoint, source: str = 'checkpoint') -> 'OrderedDict[str, torch.Tensor]':
    """The weights of ``ckpt`` under our key names, for the network ``ckpt.network_g`` builds.

    Every tensor of the file but the schedule buffers must find its place and every tensor of the network must
    be in the file, with the same shape; anything else is an error naming the keys.
    """
    own = _build_meta(ckpt.network_g).state_dict()
    key_of = public_key_map(ckpt.network_g, ckpt.format)
    absent = [f'{theirs} (for {ours})' for ours, theirs in key_of.items() if theirs not in ckpt.state]
    used = set(key_of.values())
    left = [k for k in ckpt.state if k not in used and k not in SCHEDULE_BUFFERS]
    shape = [f'{theirs} {tuple(ckpt.state[theirs].shape)} vs {ours} {tuple(own[ours].shape)}'
             for ours, theirs in key_of.items()
             if theirs in ckpt.state and tuple(ckpt.state[theirs].shape) != tuple(own[ours].shape)]
    if absent or left or shape:
        parts = ([f'{len(absent)} tensor(s) missing from the file {absent[:4]}'] if absent else []) + \
            ([f'{len(left)} tensor(s) of the file with no place in the network {left[:4]}'] if left else []) + \
            ([f'{len(shape)} of another shape {shape[:3]}'] if shape else [])
        raise ValueError(f'{source}: the {ckpt.label} does not map onto {ckpt.network_g["type"]}: '
                         + '; '.join(parts))
    return OrderedDict((ours, ckpt.state[theirs]) for ours, theirs in key_of.items())


# -- direct loading into a built network ----------------------------------------------------------------------

def _sr3_attn_levels(options: dict) -> List[int]:
    size = options['image_size']
    return [level for level in range(len(options['channel_mults'])) if size // 2**level in options['attn_resolutions']]


def fit_network(net, obj, source: str, fmt: str, strict: bool = True, warn=None) -> 'OrderedDict[str, torch.Tensor]':
    """The weights of a loaded public checkpoint under ``net``'s key names; a clear error when ``net`` (built
    from ``network_g``) is not the network of the file.

    Settings the weights cannot show (the noise-projection SiLU, the qkv bias, scale-shift, SRDiff's time
    offset) must always agree; with ``strict`` False structural differences are left to the partial load.
    """
    options = getattr(net, 'network_options', None)
    layout = LAYOUTS[fmt]
    if type(net).__name__ != layout.network_type or options is None:
        raise ValueError(f'{source} is a {fmt} checkpoint; it loads into network_g.type: {layout.network_type}, not '
                         f'{type(net).__name__}')
    # What the weights cannot tell comes from the option file (SR3: image_size, norm_groups, dropout).
    ckpt = read_public_checkpoint(obj, source, fmt, **{k: options[k] for k in layout.option_hints})
    wanted = ckpt.network_g
    behaviour = ('noise_proj_silu', 'attn_qkv_bias', 'noise_affine', 'time_offset')
    differ = []
    for key, value in wanted.items():
        if key in layout.option_hints:
            continue
        if key == 'attn_resolutions':
            if _sr3_attn_levels(options) != _sr3_attn_levels(wanted):
                differ.append((key, options[key], value, f'(attention on levels {_sr3_attn_levels(wanted)} with '
                                                          f'image_size {wanted["image_size"]})'))
            continue
        if key == 'cond_feature_indices':
            if tuple(net.cond_feature_indices) != tuple(range(2, wanted['rrdb_num_block'] + 1, 3)):
                differ.append((key, options[key], value, '(SRDiff\'s every third feature from index 2)'))
            continue
        if key in options and options[key] != value and key != 'type':
            differ.append((key, options[key], value, ''))
    if differ:
        hard = [d for d in differ if d[0] in behaviour]
        text = '; '.join(f'network_g.{k} is {_yaml_scalar(a)} in the option file but the file needs '
                         f'{_yaml_scalar(b)}{" " + why if why else ""}' for k, a, b, why in differ)
        if strict or hard:
            raise ValueError(f'{source} is a {ckpt.label} that does not fit network_g: {text}. The options of this '
                             f'file (python scripts/convert_checkpoint.py prints them):\n{ckpt.option_blocks()}')
        if warn is not None:
            warn(f'{source} ({ckpt.label}) differs from network_g: {text}; strict_load is false, so the tensors '
                 f'that fit are loaded')
    if layout.check_published is not None and ckpt.published and warn is not None:
        layout.check_published(ckpt, options, source, warn)
    # Mapped with the file's own layout; a non-strict load of a differing network then keeps what fits.
    return network_state_from_public(ckpt, source)


def _check_sr3_published(ckpt: PublicCheckpoint, options: dict, source: str, warn):
    published = next(v for v in _SR3_PUBLISHED.values() if v[0] == ckpt.published)
    if options['norm_groups'] != published[2] and not ckpt.network_g['noise_affine']:
        warn(f'{source} has the layout of {ckpt.published}, trained with norm_groups: {published[2]}, but '
             f'network_g.norm_groups is {options["norm_groups"]}; groups cannot be read from weights, so this '
             f'loads but computes another network unless the file was trained so')


@dataclass(frozen=True)
class Layout:
    """A published file layout: the network it fills, how its options and key names are read, and what the
    option file must say because the weights cannot (``option_hints``, passed to ``read``)."""
    network_type: str
    read: Callable
    key_map: Callable
    option_hints: Tuple[str, ...] = ()
    check_published: Optional[Callable] = None


LAYOUTS = {
    JANSPIRY_SR3: Layout('SR3UNet', _read_sr3, _sr3_key_map, ('image_size', 'norm_groups', 'dropout'),
                         _check_sr3_published),
    SRDIFF: Layout('SRDiffNet', _read_srdiff, lambda net: ((k, _srdiff_key(k)) for k in net.state_dict())),
}


def convert_checkpoint(in_path: str, out_path: str, fmt: Optional[str] = None, force: bool = False,
                       trusted: bool = False, image_size: Optional[int] = None, norm_groups: Optional[int] = None,
                       dropout: Optional[float] = None, scale: Optional[int] = None) -> PublicCheckpoint:
    """Read the public checkpoint ``in_path`` and write it as a BasicSR checkpoint (``params`` and
    ``params_ema``, the same weights: neither code base keeps an EMA) to ``out_path``, atomically, with the
    record that rebuilds its network and pipeline (``yoda_record``; written when the scale is known: ``scale``,
    or the published configuration's, see :func:`public_scale`).

    ``out_path`` is never overwritten unless ``force``, and never when it is ``in_path``. Returns the read
    checkpoint; :meth:`PublicCheckpoint.option_blocks` gives the option blocks for the written file.
    """
    if os.path.exists(out_path) and os.path.exists(in_path) and os.path.samefile(in_path, out_path):
        raise ValueError(f'the output {out_path} is the input file; choose another output path')
    if os.path.exists(out_path) and not force:
        raise FileExistsError(f'{out_path} exists; pass --force to overwrite it')
    obj = load_checkpoint(in_path, weights_only=not trusted)
    ckpt = read_public_checkpoint(obj, in_path, fmt, image_size, norm_groups, dropout)
    state = network_state_from_public(ckpt, in_path)
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in state.items())
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    saved = {'params': state, 'params_ema': state}
    record = public_record(ckpt, in_path, scale)
    if record is not None:  # rebuilds network and pipeline without an option file (YODAResolver.from_checkpoint)
        saved['yoda_record'] = record
    atomic_torch_save(saved, out_path)
    return ckpt


# What the published files were trained with, beyond their weights: the model class, the resize of up(LR).
_MODEL_TYPES = {'SR3UNet': 'SR3Model', 'SRDiffNet': 'SRDiffModel'}
_RESIZE = {JANSPIRY_SR3: 'pil', SRDIFF: 'matlab'}  # their data: Pillow bicubic (SR3), MATLAB imresize (SRDiff)
PUBLISHED_SR3_SCALE = 8  # both published SR3 configurations (16->128, 64->512)


def public_scale(ckpt: PublicCheckpoint, scale: Optional[int] = None) -> Optional[int]:
    """The SR scale of a read public checkpoint: ``scale`` if given, SRDiffNet's own, 8 for a published SR3
    layout; None when the weights cannot tell (an SR3 U-Net of another configuration)."""
    if scale is not None:
        return int(scale)
    if 'scale' in ckpt.network_g:
        return int(ckpt.network_g['scale'])
    return PUBLISHED_SR3_SCALE if ckpt.format == JANSPIRY_SR3 and ckpt.published else None


def public_record(ckpt: PublicCheckpoint, source: str, scale: Optional[int] = None) -> Optional[dict]:
    """The record (:mod:`.record`) of a converted public checkpoint: its network, diffusion and backbone
    sections, YODA off (vanilla weights), no attention source, the resize of its data; None when the scale is
    unknown (see :func:`public_scale`)."""
    from .record import make_record
    scale = public_scale(ckpt, scale)
    if scale is None:
        return None
    opt = {'model_type': _MODEL_TYPES[ckpt.network_g['type']], 'scale': scale, 'network_g': dict(ckpt.network_g),
           'diffusion': dict(ckpt.diffusion), 'yoda': None,
           'datasets': {'test': {'resize': _RESIZE[ckpt.format]}},
           **{k: dict(v) for k, v in ckpt.extra_sections.items()}}
    return make_record(opt, converted_from={'file': os.path.basename(source), 'format': ckpt.format,
                                            'layout': ckpt.label, 'published': ckpt.published, 'notes': ckpt.notes})


def count_parameters(network_g: dict) -> Tuple[int, int]:
    """(tensors, parameters) of the network ``network_g`` builds (no memory used)."""
    net = _build_meta(network_g)
    state = net.state_dict()
    return len(state), sum(math.prod(v.shape) for v in state.values())
