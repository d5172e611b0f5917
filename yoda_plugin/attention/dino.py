"""DINO attention sources (paper Sec. 2.2, Sec. 4.2.1, Table 1, Fig. 3).

Two sources, registered for ``build_attention_source``:

``dino_vits8``
    DINO ViT-S/8 (``dino_deitsmall8_pretrain.pth``). The six "attention heads"
    of Table 1 are the six heads of the last transformer block: for each head,
    the attention of the CLS token to every patch token (as in DINO's
    ``visualize_attention.py``), a map on the (h/8, w/8) patch grid.
``dino_resnet50``
    DINO ResNet-50 (``dino_resnet50_pretrain.pth``). A ResNet has no attention
    heads, yet the paper reports "ResNet-50 Att.-Head 0-5" without saying how
    they were made. Our definition (see :class:`DinoResNet50Attention`): the
    channels of one stage's output (``layer4``, 2048 channels, by default)
    are split into ``num_heads = 6`` contiguous groups of (nearly) equal size
    and each group's mean activation over its channels is one "head".

Common pipeline, per image (the LR image, as in the paper):

1. **Resize** (``resize``/``input_size``/``multiple``), bicubic, to the network
   input size. Default ``resize='short_side', input_size=224``: scale the
   image, keeping its aspect ratio, so that its short side is 224 pixels, then
   round each side to the nearest multiple of ``multiple`` (the ViT patch
   size 8; 32, the total stride of ResNet-50, for the ResNet). Why: DINO's
   teacher saw 224x224 global crops (paper Sec. 2.2), so objects at that scale
   are what its attention was trained on; the LR inputs of the paper are far
   smaller (16x16 gives a 2x2 patch grid, 64x64 an 8x8 one) and would give
   maps without spatial detail; keeping the aspect ratio avoids distorting
   general (non-square) images; and the cost is bounded for large images
   (DIV2K LR), because they are scaled down to the same short side.
   ``resize='fixed'`` resizes to exactly ``input_size`` (an int for a square,
   or ``(height, width)``), ``resize='none'`` keeps the size and only rounds
   each side to a multiple. Rounding is done by resizing, never by cropping,
   so the maps always cover the whole image.
   **Tiling** (``tile``/``tile_overlap``, off by default): when the resized
   input is larger than ``tile`` pixels along a side, the network does not see
   it at once but in overlapping ``tile`` x ``tile`` windows (a window spans
   the whole side where that side is not longer than ``tile``), each at
   DINO's native scale (``tile=224``: one window is exactly what the teacher
   saw in training, with its trained positional embeddings). The raw head maps
   of the windows are blended on the feature grid of the whole input with
   linear ramps over ``tile_overlap`` pixels (see :func:`tile_windows`; the
   weights of two windows overlapping by exactly ``tile_overlap`` sum to 1) and
   then go through step 3 like an untiled map, so every map is normalised once,
   over the whole image. Windows start on the feature grid, so a network whose
   grid value only depends on its own patch gives exactly the untiled map.
   Why off by default: the paper's LR images (16x16, 64x64 faces) are far
   smaller than 224, so there is nothing to tile; they need the upscaling of
   ``short_side``. For large inputs (DIV2K LR, (H, W) = (339, 510) at x4 or
   (678, 1020) at x2) the default scales the short side down to 224 and
   ResNet-50's layer4 grid becomes 7x11 cells for either; ``resize='none',
   tile=224`` keeps the image's own pixels (layer4 grids of 11x16 at x4 and
   21x32 at x2, ViT grids of 42x64 and 85x128), at the cost of one forward
   pass per window (6 at x4, 24 at x2, with the default overlap). That is the
   recommended setting for DIV2K-size images.
2. **ImageNet normalisation** (mean 0.485, 0.456, 0.406; std 0.229, 0.224,
   0.225), as in DINO's training and evaluation.
3. **Head maps** on the feature grid, **bilinear upsampling** to the original
   image size (``align_corners=False``: the grid of the resized image covers
   the original image exactly), then **per-map min-max normalisation** to
   [0, 1].
4. **Aggregation** (``heads``): ``'max'`` takes the elementwise maximum of the
   normalised head maps, ``'avg'`` their mean; both are min-max normalised
   again per image, so that the aggregated map spans [0, 1] like every other
   attention source and Eq. 9's lower bound means the same for all of them.
   An int ``heads`` (0..num_heads-1) returns that single head's map (already
   normalised). See :func:`aggregate_heads`.

A map without contrast (constant, e.g. a degenerate head) is normalised to
all zeros: it carries no information about where to diffuse, and zeros is
neutral for MAX (never the maximum unless every head is flat).

Weights are only ever read from local files, never downloaded. Lookup order:
the ``weights=`` argument, then an environment variable (``YODA_DINO_VITS8`` /
``YODA_DINO_RESNET50``), then torch hub's checkpoint folder
(``<torch.hub.get_dir()>/checkpoints/<official file name>``, where
``torch.hub.load('facebookresearch/dino:main', ...)`` would have cached it).
An explicitly given path (argument or environment variable) that does not
exist is an error; we do not fall back to another file behind the user's back.
The one exception is a bare file name as ``weights`` (what :meth:`config`
records): it is looked up in the environment variable and the hub folder.
Files are read with ``torch.load(..., weights_only=True)`` (only
``argparse.Namespace`` is additionally allowed: DINO's training checkpoints
store their command line arguments in one). Both the released backbone files
and full DINO training checkpoints (``{'teacher': {'module.backbone.<key>':
...}, 'student': ..., 'args': ...}``) are accepted; keys that do not fit the
network exactly raise ``ValueError``, so a random network is never used.
"""
import argparse
import inspect
import math
import numbers
import os
import pickle
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from yoda_plugin.attention import AttentionSource, as_rgb_float32, register_attention_source

__all__ = [
    'VisionTransformer', 'vit_small_patch8', 'resnet50_backbone', 'aggregate_heads', 'minmax_normalize',
    'resolve_weights', 'load_checkpoint', 'extract_backbone_state_dict', 'load_backbone_weights',
    'UnsafeCheckpointError', 'DinoViTS8Attention', 'DinoResNet50Attention', 'OFFICIAL_WEIGHTS', 'WEIGHTS_ENV_VARS',
    'IMAGENET_MEAN', 'IMAGENET_STD', 'RESIZE_POLICIES', 'AGGREGATIONS', 'tile_windows'
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: official DINO release file name per source
OFFICIAL_WEIGHTS = {
    'dino_vits8': 'dino_deitsmall8_pretrain.pth',
    'dino_resnet50': 'dino_resnet50_pretrain.pth',
}
#: environment variable holding a local weights path, per source
WEIGHTS_ENV_VARS = {
    'dino_vits8': 'YODA_DINO_VITS8',
    'dino_resnet50': 'YODA_DINO_RESNET50',
}
_WEIGHTS_DESCRIPTION = {
    'dino_vits8': 'the ViT-S/8 "backbone only" weights',
    'dino_resnet50': 'the ResNet-50 "backbone only" weights',
}

RESIZE_POLICIES = ('short_side', 'fixed', 'none')
AGGREGATIONS = ('max', 'avg')
_AGGREGATION_ALIASES = {'max': 'max', 'avg': 'avg', 'mean': 'avg', 'average': 'avg'}

# --------------------------------------------------------------------------------------------------------------
# ViT-S/8 with DINO's parameter names
# --------------------------------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> tokens (key ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class _SelfAttention(nn.Module):
    """Multi-head self-attention (keys ``attn.qkv``, ``attn.proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads)**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention (B, heads, N, N); every row sums to 1."""
        q, k, _ = self._qkv(x)
        return torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        # Same math as softmax(q k^T * scale) v, with PyTorch's fused kernel (less memory for large grids).
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    """Two-layer MLP with exact GELU (keys ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block (keys ``norm1``, ``attn``, ``norm2``, ``mlp``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Minimal inference-only ViT whose ``state_dict`` matches DINO's release files exactly.

    Keys: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + G*G, D) with G = img_size / patch_size,
    ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
    ``norm.{weight,bias}``. No classification head (DINO's backbones have none). Dropout and stochastic depth
    are left out: this model only runs in eval mode.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.reset_parameters()

    def reset_parameters(self):
        """Random initialisation, used only where no weights are loaded (tests): normal with std 0.02 clipped
        to +-2 std for the embeddings and linear weights, zero biases, unit LayerNorms."""
        with torch.no_grad():
            for param in (self.pos_embed, self.cls_token):
                param.normal_(std=0.02).clamp_(-0.04, 0.04)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(std=0.02).clamp_(-0.04, 0.04)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()

    @property
    def train_grid(self) -> int:
        """Side of the square patch grid ``pos_embed`` was trained for (28 for ViT-S/8 at 224)."""
        n = self.pos_embed.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f'pos_embed holds {n} patch positions, not a square grid')
        return side

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embeddings for a grid_h x grid_w patch grid: (1, 1 + grid_h*grid_w, D).

        The trained embeddings (a G x G grid) are returned unchanged for a G x G input; otherwise the patch part
        is resized bicubically (``align_corners=False``) to exactly (grid_h, grid_w), the CLS part is kept. DINO
        resizes with a scale factor (grid + 0.1) / G instead of a target size, which samples marginally different
        positions; we use the target size, the same mapping as resizing an image.
        """
        side = self.train_grid
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        cls_pos = self.pos_embed[:, :1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode='bicubic', align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, 1 + gh*gw, D) with CLS and positional embeddings, and the grid (gh, gw)."""
        if x.dim() != 4:
            raise ValueError(f'expected a (B, C, H, W) batch, got shape {tuple(x.shape)}')
        if x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise ValueError(f'input {tuple(x.shape[-2:])} is smaller than one {self.patch_size}x{self.patch_size} '
                             'patch')
        tokens, grid = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(*grid), grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS embedding (B, D), DINO's backbone output."""
        tokens, _ = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, N, N) with N = 1 + (H/p)(W/p); token 0 is CLS."""
        tokens, _ = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(tokens))


def vit_small_patch8(img_size: int = 224) -> VisionTransformer:
    """ViT-S/8 as released by DINO: embed_dim 384, depth 12, 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                             qkv_bias=True, eps=1e-6)


def resnet50_backbone() -> nn.Module:
    """torchvision ResNet-50 without weights and with ``fc = Identity`` (DINO's layout: no ``fc.`` keys)."""
    from torchvision.models import resnet50
    model = resnet50(weights=None)
    model.fc = nn.Identity()
    return model


# --------------------------------------------------------------------------------------------------------------
# Normalisation and aggregation
# --------------------------------------------------------------------------------------------------------------


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise every map over its last two (spatial) dims to [0, 1]; constant maps become 0."""
    maps = maps.float()
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span <= 1e-12 * torch.clamp(hi.abs(), min=1.0)
    out = (maps - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.zeros_like(out), out).clamp_(0.0, 1.0)


def _check_heads(heads, num_heads: int):
    """Validate ``heads``: 'max', 'avg' (alias 'mean') or an int head index 0..num_heads-1."""
    if isinstance(heads, str):
        key = heads.strip().lower()
        if key not in _AGGREGATION_ALIASES:
            raise ValueError(f"heads must be 'max', 'avg' or a head index 0..{num_heads - 1}, got {heads!r}")
        return _AGGREGATION_ALIASES[key]
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral):
        raise ValueError(f"heads must be 'max', 'avg' or a head index 0..{num_heads - 1}, got {heads!r}")
    index = int(heads)
    if not 0 <= index < num_heads:
        raise ValueError(f'head index {index} is out of range: this source has {num_heads} heads (0..{num_heads - 1})')
    return index


def aggregate_heads(maps: Union[np.ndarray, torch.Tensor], heads: Union[str, int] = 'max',
                    renormalize: bool = True) -> Union[np.ndarray, torch.Tensor]:
    """Combine head maps (..., K, H, W) into one map (..., H, W) (paper Table 1: MAX, AVG, single heads).

    ``'max'``: elementwise maximum over the K heads; ``'avg'``: elementwise mean; an int: that head alone.
    With ``renormalize`` (default) the result is min-max normalised per map to [0, 1] (a constant result
    becomes 0); a single head is returned as given when ``renormalize`` is False. Inputs are expected to be
    the per-head normalised maps. NumPy in, float32 NumPy out; a tensor in, a tensor out.
    """
    is_numpy = isinstance(maps, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(maps)) if is_numpy else maps
    if tensor.dim() < 3:
        raise ValueError(f'head maps must have shape (..., K, H, W), got {tuple(tensor.shape)}')
    tensor = tensor.float()
    mode = _check_heads(heads, tensor.shape[-3])
    if mode == 'max':
        out = tensor.amax(dim=-3)
    elif mode == 'avg':
        out = tensor.mean(dim=-3)
    else:
        out = tensor[..., mode, :, :]
    if renormalize:
        out = minmax_normalize(out)
    return out.numpy().astype(np.float32, copy=False) if is_numpy else out


# --------------------------------------------------------------------------------------------------------------
# Weights: lookup and safe loading
# --------------------------------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses: it needs arbitrary code to unpickle."""


def _hub_checkpoint_path(file_name: str) -> str:
    return os.path.join(torch.hub.get_dir(), 'checkpoints', file_name)


def _not_found(source: str, file_name: str, looked: List[str]) -> FileNotFoundError:
    official, env_var = OFFICIAL_WEIGHTS[source], WEIGHTS_ENV_VARS[source]
    places = '\n'.join(f'  {i}. {place}' for i, place in enumerate(looked, 1))
    wanted = f'{file_name!r}' + ('' if file_name == official else f' (the official file is named {official!r})')
    return FileNotFoundError(
        f'DINO weights for attention source {source!r} not found: need the file {wanted}, '
        f'{_WEIGHTS_DESCRIPTION[source]}. Looked in, in this order:\n{places}\n'
        f'Nothing is ever downloaded. Get {official} from the "Pretrained models" section of the README of '
        f'the DINO repository (facebookresearch/dino on GitHub) and either pass weights=<path>, or set the '
        f'environment variable {env_var}=<path>, or place it in the torch hub checkpoint folder '
        f'{os.path.dirname(_hub_checkpoint_path(official))}.')


def resolve_weights(source: str, weights: Optional[Union[str, os.PathLike]] = None) -> str:
    """Local path of the weights of ``source`` ('dino_vits8' or 'dino_resnet50'); nothing is downloaded.

    Lookup order:

    1. ``weights``: a file, or a folder holding the official file. A path that does not exist raises at once
       (we never fall back to some other file behind the user's back), except a bare file name (no folder,
       e.g. the ``weights`` entry of :meth:`config`), which is then searched for in 2. and 3.;
    2. the environment variable ``WEIGHTS_ENV_VARS[source]`` (a file or a folder). When set, it must exist;
       with a bare file name in 1. it is only used when it names a file of that name;
    3. ``<torch.hub.get_dir()>/checkpoints/<file name>``.

    Raises FileNotFoundError naming the file, every place looked at and where to get the weights.
    """
    if source not in OFFICIAL_WEIGHTS:
        raise ValueError(f'unknown DINO source {source!r}; known: {", ".join(OFFICIAL_WEIGHTS)}')
    file_name, env_var = OFFICIAL_WEIGHTS[source], WEIGHTS_ENV_VARS[source]
    looked: List[str] = []
    if weights is not None:
        path = os.path.expanduser(os.fspath(weights))
        if os.path.isdir(path):
            path = os.path.join(path, file_name)
        if os.path.isfile(path):
            return path
        if os.path.dirname(path) or not path:
            raise _not_found(source, os.path.basename(path) or file_name, [
                f'weights= argument: {path} (no such file; an explicit path is used as given, so the environment '
                f'variable {env_var} and the torch hub checkpoint folder {_hub_checkpoint_path(file_name)} '
                'were not consulted)'
            ])
        file_name = path  # a bare file name: look for it below
        looked.append(f'weights= argument: {path!r} (no such file in the current directory {os.getcwd()}; '
                      'searched for by name below)')
    else:
        looked.append('weights= argument: not given')
    env_value = os.environ.get(env_var, '').strip()
    if env_value:
        env_path = os.path.expanduser(env_value)
        if os.path.isdir(env_path):
            env_path = os.path.join(env_path, file_name)
        if weights is not None and os.path.basename(env_path) != file_name:
            looked.append(f'environment variable {env_var}={env_value!r}: names another file, skipped')
        elif os.path.isfile(env_path):
            return env_path
        else:
            hub_path = _hub_checkpoint_path(file_name)
            raise _not_found(source, file_name, looked + [
                f'environment variable {env_var}={env_value!r}: {env_path} (no such file; when the variable is '
                f'set it must point to the weights, so the torch hub checkpoint folder {hub_path} was not '
                'consulted)'
            ])
    else:
        looked.append(f'environment variable {env_var}: not set')
    hub_path = _hub_checkpoint_path(file_name)
    if os.path.isfile(hub_path):
        return hub_path
    looked.append(f'torch hub checkpoint folder: {hub_path} (no such file)')
    raise _not_found(source, file_name, looked)


def load_checkpoint(path: Union[str, os.PathLike]):
    """``torch.load(path, map_location='cpu', weights_only=True)``, with ``argparse.Namespace`` allowed.

    DINO's training checkpoints hold their command line in an ``argparse.Namespace`` (plain attributes, no
    code); everything else must be tensors and plain containers. A file that needs more (any other class) is
    refused with :class:`UnsafeCheckpointError` (a ``pickle.UnpicklingError``); a file that is no torch
    checkpoint at all raises ValueError.
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        told = re.sub(r'\x1b\[[0-9;]*m', '', str(err))  # torch's message carries terminal colour codes
        if 'weights only' in told.lower() or 'weights_only' in told.lower():
            raise UnsafeCheckpointError(
                f'refusing to load {path}: it contains objects that can only be unpickled by running arbitrary '
                'code, so torch.load(weights_only=True) rejected it, and this plugin never loads checkpoints with '
                'weights_only=False. DINO weights are plain tensors (training checkpoints add an '
                'argparse.Namespace, which is allowed), so a genuine DINO file never needs this. If you trust the '
                'file, re-save only its tensors in a trusted environment (torch.save(state_dict, new_path)) and '
                f'load that.\ntorch.load said: {told}') from err
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {told}') from err
    except Exception as err:  # corrupt or foreign files fail in many ways (EOFError, RuntimeError, IndexError...)
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})') from err


_PREFIXES = ('module.', 'backbone.')


def extract_backbone_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """Backbone state dict from a released DINO file or a DINO training checkpoint.

    A mapping with a ``teacher`` entry is a training checkpoint: its teacher weights are used (DINO evaluates
    the teacher). Leading ``module.`` (DistributedDataParallel) and ``backbone.`` (MultiCropWrapper) prefixes
    are stripped and ``head.`` (DINO projection head) keys dropped. Entries that are not tensors are kept as
    they are, so that they show up as unexpected keys.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'a DINO checkpoint is a mapping of parameter names to tensors, got '
                         f'{type(checkpoint).__name__}')
    state = checkpoint
    if isinstance(checkpoint.get('teacher'), Mapping):
        state = checkpoint['teacher']
    out = {}
    for key, value in state.items():
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.startswith('head.'):
            continue
        out[key] = value
    return out


def _preview(keys: Sequence[str], limit: int = 6) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def load_backbone_weights(model: nn.Module, state_dict: Mapping, where: str = 'checkpoint',
                          optional_suffixes: Tuple[str, ...] = ('num_batches_tracked', )) -> None:
    """Load ``state_dict`` into ``model`` strictly; raise ValueError listing missing/unexpected/misshaped keys.

    Only buffers ending in ``optional_suffixes`` (BatchNorm's ``num_batches_tracked``, unused in eval mode)
    may be absent; they keep the model's value.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(optional_suffixes)]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in state_dict if k in expected and not isinstance(state_dict[k], torch.Tensor)]
    wrong_shape = [
        f'{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})' for k in state_dict
        if k in expected and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or not_tensors or wrong_shape:
        parts = [f'{len(missing)} missing key(s)' + (f': {_preview(missing)}' if missing else ''),
                 f'{len(unexpected)} unexpected key(s)' + (f': {_preview(unexpected)}' if unexpected else '')]
        if wrong_shape:
            parts.append(f'{len(wrong_shape)} key(s) with a wrong shape: {_preview(wrong_shape, 4)}')
        if not_tensors:
            parts.append(f'{len(not_tensors)} key(s) that are not tensors: {_preview(not_tensors)}')
        raise ValueError(f'{where} does not fit {type(model).__name__} ({len(expected)} keys expected): '
                         + '; '.join(parts) + '. Refusing to run with missing or random weights.')
    full = {k: (state_dict[k] if k in state_dict else expected[k]) for k in expected}
    model.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------


def prepare_image(image) -> np.ndarray:
    """Contiguous float32 RGB (H, W, 3) in [0, 1]: the attention sources' input contract (no uint8 round trip)."""
    return as_rgb_float32(image)


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def network_input_size(height: int, width: int, resize: str = 'short_side',
                       input_size: Union[int, Sequence[int]] = 224, multiple: int = 8) -> Tuple[int, int]:
    """Size (h, w) the network sees for an image of (height, width) under a resize policy (module doc, step 1)."""
    if resize == 'short_side':
        scale = input_size / min(height, width)
        size = (height * scale, width * scale)
    elif resize == 'fixed':
        size = (input_size, input_size) if isinstance(input_size, numbers.Number) else tuple(input_size)
    elif resize == 'none':
        size = (height, width)
    else:
        raise ValueError(f'resize must be one of {RESIZE_POLICIES}, got {resize!r}')
    return _round_to_multiple(size[0], multiple), _round_to_multiple(size[1], multiple)


def _check_resize(resize, input_size, multiple) -> Tuple[str, Union[int, Tuple[int, int]], int]:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f'resize must be one of {RESIZE_POLICIES}, got {resize!r}')
    if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
        raise ValueError(f'multiple must be a positive int, got {multiple!r}')

    def positive_int(v):
        return not isinstance(v, bool) and isinstance(v, numbers.Integral) and v > 0

    if positive_int(input_size):
        input_size = int(input_size)
    elif (resize == 'fixed' and isinstance(input_size, (tuple, list)) and len(input_size) == 2
          and all(map(positive_int, input_size))):
        input_size = (int(input_size[0]), int(input_size[1]))
    else:
        extra = " or (height, width) for resize='fixed'" if resize == 'fixed' else ''
        raise ValueError(f'input_size must be a positive int{extra}, got {input_size!r}')
    return resize, input_size, int(multiple)


def tile_windows(length: int, tile: int, overlap: int) -> List[Tuple[int, np.ndarray]]:
    """Windows along one axis of ``length`` cells: ``[(start, weights), ...]``, ``weights`` of ``min(tile, length)``.

    One window ``[0, length)`` when ``length <= tile``. Otherwise ``n = ceil((length - tile) / (tile - overlap)) + 1``
    windows of ``tile`` cells with evenly spread starts (rounded to whole cells), the first at 0, the last ending
    at ``length``; neighbours overlap by at least ``overlap`` cells. Blending weights: 1, except on a side that
    has a neighbour, where they ramp linearly over ``overlap`` cells, ``(j + 0.5) / overlap`` for the j-th cell
    from that side; so where two windows overlap by exactly ``overlap`` cells their weights sum to 1, and no
    weight is 0 (every cell is covered with a positive total weight). ``overlap = 0`` gives weight 1 everywhere.
    """
    for name, value in (('length', length), ('tile', tile), ('overlap', overlap)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f'{name} must be an int, got {value!r}')
    if length < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f'need length >= 1, tile >= 1 and 0 <= overlap < tile, got {length}, {tile}, {overlap}')
    if length <= tile:
        return [(0, np.ones(length, np.float32))]
    n = -(-(length - tile) // (tile - overlap)) + 1
    starts = [(2 * i * (length - tile) + (n - 1)) // (2 * (n - 1)) for i in range(n)]  # round(i (L - T) / (n - 1))
    ramp = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap if overlap else np.zeros(0)
    windows = []
    for i, start in enumerate(starts):
        weights = np.ones(tile, np.float64)
        if overlap and i > 0:
            weights[:overlap] = ramp
        if overlap and i < n - 1:
            weights[tile - overlap:] = np.minimum(weights[tile - overlap:], ramp[::-1])
        windows.append((start, weights.astype(np.float32)))
    return windows


def _check_tile(tile, tile_overlap, cell: int, multiple: int) -> Tuple[Optional[int], Optional[int]]:
    """Validate ``tile``/``tile_overlap`` (pixels of the network input) for a feature grid of ``cell`` pixels."""
    def is_int(v):
        return not isinstance(v, bool) and isinstance(v, numbers.Integral)

    if tile is None:
        if tile_overlap is not None:
            raise ValueError(f'tile_overlap={tile_overlap!r} needs tile (tiling is off with tile=None)')
        return None, None
    if not is_int(tile) or tile < cell or tile % cell:
        raise ValueError(f'tile must be None or a positive multiple of the feature grid stride {cell} pixels, '
                         f'got {tile!r}')
    if multiple % cell:
        raise ValueError(f'tiling needs input sides that are multiples of the feature grid stride {cell}: '
                         f'multiple={multiple} is not')
    tile = int(tile)
    if tile_overlap is None:
        tile_overlap = (tile // 4) // cell * cell
    if not is_int(tile_overlap) or not 0 <= tile_overlap < tile or tile_overlap % cell:
        raise ValueError(f'tile_overlap must be a multiple of the feature grid stride {cell} pixels in '
                         f'[0, tile={tile}), got {tile_overlap!r}')
    return tile, int(tile_overlap)


# --------------------------------------------------------------------------------------------------------------
# Attention sources
# --------------------------------------------------------------------------------------------------------------


class _DinoAttentionSource(AttentionSource):
    """Shared pipeline of the DINO sources: weights, resize, normalise, head maps, aggregation, batching.

    ``config()`` holds the name and every constructor parameter that changes the maps, with ``weights`` as the
    file name only (no folder: maps do not depend on where the file lies, and the name is found again through
    the environment variable or the hub folder by ``build_attention_source_from_config``). ``device`` and
    ``max_batch`` are left out: they change where and how fast maps are computed, not what they are. ``tile``
    and ``tile_overlap`` are kept (``None`` when tiling is off; the overlap as resolved from its default).
    """

    name = ''
    default_multiple = 8
    num_heads = 6
    _runtime_parameters = ('device', 'max_batch')

    def __init__(self, heads: Union[str, int] = 'max', weights: Optional[Union[str, os.PathLike]] = None,
                 device: Union[str, torch.device] = 'cpu', resize: str = 'short_side',
                 input_size: Union[int, Sequence[int]] = 224, multiple: Optional[int] = None, max_batch: int = 8,
                 tile: Optional[int] = None, tile_overlap: Optional[int] = None):
        self.resize, self.input_size, self.multiple = _check_resize(
            resize, input_size, self.default_multiple if multiple is None else multiple)
        if isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1:
            raise ValueError(f'max_batch must be a positive int, got {max_batch!r}')
        self.max_batch = int(max_batch)
        self._validate_options()
        self.tile, self.tile_overlap = _check_tile(tile, tile_overlap, self.grid_stride, self.multiple)
        self.heads = _check_heads(heads, self.num_heads)
        self.device = torch.device(device)
        self.weights_path = resolve_weights(self.name, weights)
        self.weights = os.path.basename(self.weights_path)
        state_dict = extract_backbone_state_dict(load_checkpoint(self.weights_path))  # fails before any build
        model = self._build_model()
        load_backbone_weights(model, state_dict, where=self.weights_path)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    # -- provided by subclasses --------------------------------------------------------------------------------
    def _validate_options(self):
        """Check subclass options; called before ``heads`` is validated against ``num_heads``."""

    def _build_model(self) -> nn.Module:
        raise NotImplementedError

    def _grid_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised network input (B, 3, h, w) -> raw head maps (B, num_heads, gh, gw)."""
        raise NotImplementedError

    @property
    def grid_stride(self) -> int:
        """Pixels of network input per cell of the head-map grid (the ViT patch size, the ResNet stage stride)."""
        return self.default_multiple

    # -- pipeline ----------------------------------------------------------------------------------------------
    def network_input_size(self, height: int, width: int) -> Tuple[int, int]:
        """Input size (h, w) the network sees for an image of (height, width)."""
        return network_input_size(height, width, self.resize, self.input_size, self.multiple)

    @torch.no_grad()
    def head_maps_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1], one size for all -> normalised head maps (B, K, H, W), float32, CPU."""
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f'expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}')
        height, width = batch.shape[-2:]
        size = self.network_input_size(height, width)
        x = batch.to(self.device, torch.float32)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode='bicubic', align_corners=False,
                              antialias=size[0] < height or size[1] < width).clamp_(0.0, 1.0)
        x = (x - self._mean) / self._std
        if self.tile is not None and (size[0] > self.tile or size[1] > self.tile):
            grid_maps = self._tiled_grid_maps(x)
        else:
            grid_maps = self._grid_maps(x).float()
        maps = F.interpolate(grid_maps, size=(height, width), mode='bilinear', align_corners=False)
        return minmax_normalize(maps).cpu()

    def tile_boxes(self, height: int, width: int) -> List[Tuple[int, int, int, int]]:
        """Windows ``(top, left, h, w)``, in network-input pixels, for an image of (height, width).

        A single box covering the whole input when tiling is off or the input is not larger than ``tile``.
        """
        size = self.network_input_size(height, width)
        if self.tile is None or (size[0] <= self.tile and size[1] <= self.tile):
            return [(0, 0, size[0], size[1])]
        s = self.grid_stride
        rows = tile_windows(size[0] // s, self.tile // s, self.tile_overlap // s)
        cols = tile_windows(size[1] // s, self.tile // s, self.tile_overlap // s)
        return [(top * s, left * s, len(wy) * s, len(wx) * s) for top, wy in rows for left, wx in cols]

    def _tiled_grid_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head maps on the feature grid of the whole input (B, 3, H, W), blended from overlapping windows.

        Windows are cut at multiples of ``grid_stride``, so window cell (i, j) is input cell (top + i, left + j);
        each window's raw maps are weighted by the outer product of its :func:`tile_windows` ramps, summed and
        divided by the summed weights. All windows of all images go through the network in chunks of at most
        ``max_batch``.
        """
        b, _, height, width = x.shape
        s = self.grid_stride
        if height % s or width % s:
            raise RuntimeError(f'network input {(height, width)} is not a multiple of the grid stride {s}')
        rows = tile_windows(height // s, self.tile // s, self.tile_overlap // s)
        cols = tile_windows(width // s, self.tile // s, self.tile_overlap // s)
        th, tw = len(rows[0][1]), len(cols[0][1])
        boxes = [(top, left, torch.from_numpy(np.outer(wy, wx))) for top, wy in rows for left, wx in cols]
        crops = torch.stack([x[:, :, top * s:(top + th) * s, left * s:(left + tw) * s] for top, left, _ in boxes],
                            dim=1).flatten(0, 1)  # (B * n, 3, th * s, tw * s), image-major
        outputs = []
        for start in range(0, crops.shape[0], self.max_batch):
            out = self._grid_maps(crops[start:start + self.max_batch]).float()
            if tuple(out.shape[-2:]) != (th, tw):
                raise RuntimeError(f'{type(self).__name__} returned a {tuple(out.shape[-2:])} grid for a '
                                   f'{(th * s, tw * s)} window; expected {(th, tw)}')
            outputs.append(out)
        grid = torch.cat(outputs).reshape(b, len(boxes), -1, th, tw)
        acc = torch.zeros(b, grid.shape[2], height // s, width // s, device=grid.device)
        total = torch.zeros(height // s, width // s, device=grid.device)
        for i, (top, left, weight) in enumerate(boxes):
            weight = weight.to(grid.device)
            acc[:, :, top:top + th, left:left + tw] += grid[:, i] * weight
            total[top:top + th, left:left + tw] += weight
        return acc / total

    def _run(self, prepared: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """Head maps for prepared images; images of one size are stacked, at most ``max_batch`` at a time."""
        results: List[Optional[torch.Tensor]] = [None] * len(prepared)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for index, image in enumerate(prepared):
            groups.setdefault(tuple(image.shape[:2]), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start:start + self.max_batch]
                stacked = torch.from_numpy(np.stack([prepared[i] for i in chunk])).permute(0, 3, 1, 2)
                for i, maps in zip(chunk, self.head_maps_tensor(stacked)):
                    results[i] = maps
        return results

    def prepare(self, image) -> np.ndarray:
        """Float32 RGB (H, W, 3) in [0, 1] (see :func:`prepare_image`)."""
        return prepare_image(image)

    def compute(self, image: np.ndarray) -> np.ndarray:
        """Aggregated map (H, W) of a prepared image (``__call__`` of the base class validates and clips it)."""
        return aggregate_heads(self._run([image])[0], self.heads).numpy()

    def head_maps(self, image) -> np.ndarray:
        """All normalised head maps of one image: float32 (num_heads, H, W) in [0, 1] (paper Fig. 3)."""
        return self._run([self.prepare(image)])[0].numpy()

    def batch_head_maps(self, images: Sequence) -> List[np.ndarray]:
        """:meth:`head_maps` for a list of images, batched like :meth:`batch`."""
        return [m.numpy() for m in self._run([self.prepare(image) for image in images])]

    def batch(self, images: Sequence) -> List[np.ndarray]:
        """Maps for a list of images: float32 (H, W) in [0, 1] each; equal sizes run as one stacked batch."""
        maps = self._run([self.prepare(image) for image in images])
        return [np.clip(aggregate_heads(m, self.heads).numpy().astype(np.float32), 0.0, 1.0) for m in maps]

    def config(self) -> dict:
        """Name and map-defining constructor parameters (JSON types); see the class docstring."""
        cfg = {'name': self.name}
        for param in list(inspect.signature(type(self).__init__).parameters.values())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in self._runtime_parameters:
                continue
            value = getattr(self, param.name)
            cfg[param.name] = list(value) if isinstance(value, tuple) else value
        return cfg


@register_attention_source
class DinoViTS8Attention(_DinoAttentionSource):
    """DINO ViT-S/8: CLS-to-patch attention of the 6 heads of the last block (DINO's attention maps).

    Args:
        heads: ``'max'`` (default; the paper's best ViT variant), ``'avg'`` or a head index 0..5.
        weights: local ``dino_deitsmall8_pretrain.pth`` (or a DINO training checkpoint, or a folder holding the
            official file); else ``$YODA_DINO_VITS8``, else ``<torch hub dir>/checkpoints/``.
        device: ``'cpu'`` or ``'cuda'`` (any torch device).
        resize / input_size / multiple: input size policy, default short side 224 and sides rounded to a multiple
            of 8 (the patch size; ``multiple`` must be a multiple of 8). See the module docstring.
        max_batch: most images of one size (or windows, when tiling) stacked into one forward pass.
        tile / tile_overlap: sliding windows for large inputs (module docstring, step 1). ``tile=None``
            (default) is off; ``tile`` is the window side in network-input pixels, a multiple of 8 (224: DINO's
            training crop); ``tile_overlap`` a multiple of 8 below ``tile``, default ``tile // 4`` rounded down
            to a multiple of 8 (56 for 224). For DIV2K-size images use ``resize='none', tile=224``.
    """

    name = 'dino_vits8'
    default_multiple = 8
    num_heads = 6

    def _validate_options(self):
        if self.multiple % 8:
            raise ValueError(f'multiple must be a multiple of the ViT patch size 8, got {self.multiple}')

    def _build_model(self) -> nn.Module:
        return vit_small_patch8()

    def _grid_maps(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.model.get_last_selfattention(x)  # (B, heads, N, N)
        grid_h, grid_w = x.shape[-2] // self.model.patch_size, x.shape[-1] // self.model.patch_size
        cls_to_patches = attn[:, :, 0, 1:]
        return cls_to_patches.reshape(x.shape[0], attn.shape[1], grid_h, grid_w)


_RESNET_LAYERS = {'layer1': 256, 'layer2': 512, 'layer3': 1024, 'layer4': 2048}
_RESNET_STRIDES = {'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}
_RESNET_REDUCTIONS = ('mean', 'norm')


@register_attention_source
class DinoResNet50Attention(_DinoAttentionSource):
    """DINO ResNet-50 with "attention heads" defined as channel groups of one stage.

    A ResNet has no attention heads, but the paper reports "ResNet-50 Att.-Head 0-5" (Table 1, Fig. 3). We
    define head k as follows: take the output of stage ``layer`` (default ``layer4``, 2048 channels, stride 32;
    post-ReLU, so non-negative), split its channels into ``num_heads`` (default 6) contiguous groups whose sizes
    differ by at most one (``torch.tensor_split``: 342, 342, 341, 341, 341, 341 channels for layer4), and reduce each
    group over its channels: ``reduction='mean'`` (default) is the group's mean activation, the classic
    channel-averaged activation map used as a CAM-free saliency (no classifier or labels needed, which a
    self-supervised backbone lacks); ``reduction='norm'`` is the L2 norm over the group's channels (feature
    magnitude, more sensitive to a few strongly firing channels). Each map is then upsampled bilinearly to the
    image size and min-max normalised like the ViT heads. Why channel groups: they give ``num_heads``
    different maps of the same layer, as attention heads do, they need nothing beyond the released backbone,
    and the channel-size-weighted mean of the raw group maps is exactly the usual full channel-mean activation
    map. ResNet channels have no order, so which channels share a group is arbitrary: single "heads" have no
    meaning of their own (as in the paper, where they score below MAX/AVG), MAX and AVG are the stable
    summaries. ``layer`` and ``num_heads`` are configurable for that reason.

    Args:
        heads: ``'max'`` (default; the paper's final choice), ``'avg'`` or a head index 0..num_heads-1.
        weights: local ``dino_resnet50_pretrain.pth`` (or a DINO training checkpoint, or a folder holding the
            official file); else ``$YODA_DINO_RESNET50``, else ``<torch hub dir>/checkpoints/``.
        layer: ``'layer1'`` .. ``'layer4'`` (default ``'layer4'``, the last stage).
        num_heads: number of channel groups (default 6, as in the paper).
        reduction: ``'mean'`` (default) or ``'norm'``.
        device, resize, input_size, multiple (default 32, the stride of layer4), max_batch: as for
            :class:`DinoViTS8Attention`.
        tile / tile_overlap: as for :class:`DinoViTS8Attention`, but in multiples of the stride of ``layer``
            (:attr:`grid_stride`, 32 for layer4); the default overlap ``tile // 4`` is rounded down to such a
            multiple (32 for ``tile=224`` with layer4). ``multiple`` must be a multiple of that stride too.
    """

    name = 'dino_resnet50'
    default_multiple = 32

    def __init__(self, heads: Union[str, int] = 'max', weights: Optional[Union[str, os.PathLike]] = None,
                 device: Union[str, torch.device] = 'cpu', layer: str = 'layer4', num_heads: int = 6,
                 reduction: str = 'mean', resize: str = 'short_side', input_size: Union[int, Sequence[int]] = 224,
                 multiple: Optional[int] = None, max_batch: int = 8, tile: Optional[int] = None,
                 tile_overlap: Optional[int] = None):
        if layer not in _RESNET_LAYERS:
            raise ValueError(f'layer must be one of {tuple(_RESNET_LAYERS)}, got {layer!r}')
        if reduction not in _RESNET_REDUCTIONS:
            raise ValueError(f'reduction must be one of {_RESNET_REDUCTIONS}, got {reduction!r}')
        channels = _RESNET_LAYERS[layer]
        if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or not 1 <= num_heads <= channels:
            raise ValueError(f'num_heads must be an int in 1..{channels} (channels of {layer}), got {num_heads!r}')
        self.layer = layer
        self.reduction = reduction
        self.num_heads = int(num_heads)
        super().__init__(heads=heads, weights=weights, device=device, resize=resize, input_size=input_size,
                         multiple=multiple, max_batch=max_batch, tile=tile, tile_overlap=tile_overlap)

    @property
    def grid_stride(self) -> int:
        """Total stride of stage ``layer``: 4, 8, 16 or 32 pixels."""
        return _RESNET_STRIDES[self.layer]

    def _build_model(self) -> nn.Module:
        return resnet50_backbone()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of stage ``self.layer`` for a normalised input batch: (B, C, h/s, w/s)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for name in _RESNET_LAYERS:
            x = getattr(m, name)(x)
            if name == self.layer:
                break
        return x

    def _grid_maps(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.tensor_split(self.features(x), self.num_heads, dim=1)
        if self.reduction == 'mean':
            maps = [g.mean(dim=1) for g in groups]
        else:
            maps = [torch.linalg.vector_norm(g, dim=1) for g in groups]
        return torch.stack(maps, dim=1)

