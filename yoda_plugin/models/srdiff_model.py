"""SRDiff (Li et al. 2022) with and without YODA, as a BasicSR model.

SRDiff diffuses the residual between the HR image and the bicubic-upsampled
LR image, conditioned on the features of a pretrained, frozen RRDB LR
encoder (``SRDiffNet``). With YODA the unrefined component z^LR has mean 0
in this residual space (paper Sec. 4.1.2), so the YODA core gets
``lr_mean = zeros``.

Residual scaling, as SRDiff's ``img2res`` / ``res2img`` (``res: true``,
``res_rescale: 2``, ``clip_input: true``): SRDiff works on images in
[-1, 1] and diffuses ``x0 = (HR - up(LR)) * res_rescale`` clipped to [-1, 1];
on our [0, 1] images that is ``x0 = 2 * res_rescale * (HR - up(LR))``
(= 4 (HR - up) for res_rescale 2): residuals beyond +-0.25 of the [0, 1]
range are clipped in training (rare: bicubic misses a quarter of the range
only at the strongest edges). Each reverse step clips the predicted x0 to
[-1, 1] (SRDiff's ``clip_denoised``), and the output is
``up(LR) + clip(z_0, -1, 1) / (2 * res_rescale)``, clamped to [0, 1].

Everything else (validation with reports, EMA, atomic checkpoints, NaN
policy, ranks-in-sync checks) comes from :class:`SR3Model`. Differences:

* network call: ``net_g(z_t, lq, t)`` with integer training time steps t
  (SRDiff embeds t, not SR3's continuous noise level), so
  ``diffusion.continuous_noise_level`` must be false; defaults are SRDiff's:
  cosine schedule, T = 100, sampling on all T steps.
* the RRDB encoder: loaded from ``path.pretrain_network_rrdb`` (a BasicSR
  RRDBNet checkpoint, ``weights_only=True``) and frozen unless
  ``train.freeze_rrdb: false``. Its unused up-sampling head is always frozen.
* sampling: the encoder runs once per image, whole images are padded
  (reflection) to the network's size multiple and cropped back, and
  ``val.tile_size`` / ``val.tile_overlap`` / ``val.tile_margin`` switch on
  tiled sampling (see :mod:`yoda_plugin.core.tiling`).
"""
import math
import os

import torch
import torch.nn.functional as F
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from yoda_plugin.core import sample_loop, training_inputs
from yoda_plugin.core.tiling import check_tiling, tiled_net_fn

from .sr3_model import SR3Model

SRDIFF_DEFAULTS = {'res_rescale': 2.0, 'clip_input': True}
SRDIFF_DIFFUSION_DEFAULTS = {'schedule': 'cosine', 'num_timesteps': 100, 'continuous_noise_level': False}
TILE_KEYS = ('tile_size', 'tile_overlap', 'tile_margin')


def residual_scale(res_rescale: float) -> float:
    """Factor from [0, 1] image units to SRDiff's residual units: 2 * res_rescale."""
    return 2.0 * float(res_rescale)


def to_residual(hr: torch.Tensor, lq_up: torch.Tensor, res_rescale: float = 2.0, clip: bool = True) -> torch.Tensor:
    """x0 = (HR - up(LR)) * 2 * res_rescale, clipped to [-1, 1] when ``clip`` (SRDiff's img2res)."""
    x0 = (hr - lq_up) * residual_scale(res_rescale)
    return x0.clamp(-1.0, 1.0) if clip else x0


def from_residual(x0: torch.Tensor, lq_up: torch.Tensor, res_rescale: float = 2.0, clip: bool = True) -> torch.Tensor:
    """HR = up(LR) + x0 / (2 * res_rescale), x0 clipped to [-1, 1] first when ``clip`` (SRDiff's res2img)."""
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return lq_up + x0 / residual_scale(res_rescale)


def srdiff_options(opt) -> dict:
    opt = dict(opt or {})
    unknown = sorted(set(opt) - set(SRDIFF_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown option(s) {["srdiff." + k for k in unknown]}; known: {sorted(SRDIFF_DEFAULTS)}')
    out = {**SRDIFF_DEFAULTS, **opt}
    r = out['res_rescale']
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r):
        raise ValueError(f'srdiff.res_rescale must be a positive number, got {r!r}')
    if not isinstance(out['clip_input'], bool):
        raise ValueError(f'srdiff.clip_input must be true or false, got {out["clip_input"]!r}')
    return out


def _pad(x: torch.Tensor, bottom: int, right: int, mode: str) -> torch.Tensor:
    if not bottom and not right:
        return x
    if mode == 'reflect' and (bottom >= x.shape[2] or right >= x.shape[3]):
        mode = 'replicate'  # reflection needs the pad to be smaller than the image
    return F.pad(x, (0, right, 0, bottom), mode=mode)


def read_rrdb_checkpoint(path: str, param_key=None) -> dict:
    """The state dict of a BasicSR RRDBNet checkpoint (``{'params': ..., 'params_ema': ...}``).

    ``param_key`` None prefers ``params_ema`` then ``params``; a file that is
    itself a state dict is accepted. Loaded with ``weights_only=True``.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f'path.pretrain_network_rrdb: RRDB checkpoint {path!r} does not exist. Pretrain the '
                                f'encoder first (python -m yoda_plugin train -opt options/train_rrdb_srdiff_pretrain.'
                                f'yml writes experiments/<name>/models/net_g_latest.pth) and point to that file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'path.pretrain_network_rrdb: cannot load {path} as a weights-only PyTorch checkpoint: '
                         f'{err}') from err
    if not isinstance(ckpt, dict):
        raise ValueError(f'path.pretrain_network_rrdb: {path} holds a {type(ckpt).__name__}, expected a BasicSR '
                         f'checkpoint dict with "params" / "params_ema"')
    if param_key is not None:
        if param_key not in ckpt:
            raise KeyError(f'path.param_key_rrdb: {path} has no entry {param_key!r}; it has {sorted(ckpt)[:8]}')
        state = ckpt[param_key]
    elif 'params_ema' in ckpt:
        state = ckpt['params_ema']
    elif 'params' in ckpt:
        state = ckpt['params']
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state = ckpt
    else:
        raise KeyError(f'path.pretrain_network_rrdb: {path} has neither "params_ema" nor "params" (BasicSR layout); '
                       f'entries: {sorted(ckpt)[:8]}')
    if not isinstance(state, dict):
        raise ValueError(f'path.pretrain_network_rrdb: the weights in {path} are a {type(state).__name__}, '
                         f'expected a state dict')
    return state


@MODEL_REGISTRY.register()
class SRDiffModel(SR3Model):
    """SRDiff residual diffusion; YODA on or off via the ``yoda`` section.

    Extra options on top of :class:`SR3Model`:
        network_g: ``type: SRDiffNet`` (see ``yoda_plugin/archs/srdiff_arch.py``).
        srdiff: res_rescale (2.0), clip_input (true): SRDiff's residual scaling.
        diffusion: as SR3Model, with SRDiff defaults (cosine, T = 100,
            sample_steps = T); continuous_noise_level must be false.
        path.pretrain_network_rrdb: BasicSR RRDBNet checkpoint for the encoder
            (used when training starts without ``pretrain_network_g``; a full
            SRDiff checkpoint, e.g. when resuming, already holds the encoder).
        path.param_key_rrdb: entry of that file (default: params_ema, else params).
        path.strict_load_rrdb: all keys and shapes must match (default true).
        train.freeze_rrdb: keep the encoder fixed (default true, SRDiff's fix_rrdb).
        val.tile_size / val.tile_overlap / val.tile_margin: tiled sampling in
            HR pixels (null tile_size: whole image).
        val.sparse: as SR3Model; crops align to lcm(UNet factor, scale) and
            are tiled like the whole image when larger than a tile.
    """

    # Option keys beyond BasicSR's and SR3Model's (read by tests/test_options.py).
    extra_option_keys = {'': {'srdiff'}, 'train': {'freeze_rrdb'}}

    def __init__(self, opt):
        self.srdiff_opt = srdiff_options(opt.get('srdiff'))
        diffusion = dict(opt.get('diffusion') or {})
        if diffusion.get('continuous_noise_level'):
            raise ValueError('diffusion.continuous_noise_level must be false for SRDiffModel: SRDiff\'s network embeds '
                             'integer time steps, not a continuous noise level')
        diffusion = {**SRDIFF_DIFFUSION_DEFAULTS, **diffusion}
        diffusion.setdefault('sample_steps', diffusion['num_timesteps'])
        val = dict(opt.get('val') or {})
        tile = {k: val.pop(k, None) for k in TILE_KEYS}
        self.tile_opt = {'tile_size': tile['tile_size'], 'tile_overlap': tile['tile_overlap'] or 0,
                         'tile_margin': tile['tile_margin']}
        self.freeze_rrdb = (opt.get('train') or {}).get('freeze_rrdb', True)
        if not isinstance(self.freeze_rrdb, bool):
            raise ValueError(f'train.freeze_rrdb must be true or false, got {self.freeze_rrdb!r}')
        # Shallow copy: SR3Model checks the val keys it knows and reads the diffusion defaults from here.
        opt = dict(opt)
        opt['diffusion'] = diffusion
        if opt.get('val') is not None:
            opt['val'] = val
        super().__init__(opt)
        net = self.get_bare_model(self.net_g)
        if net.__class__.__name__ != 'SRDiffNet':
            raise ValueError(f'SRDiffModel needs network_g.type: SRDiffNet, got {net.__class__.__name__}')
        if net.scale != opt['scale']:
            raise ValueError(f'network_g.scale={net.scale} differs from the top-level scale={opt["scale"]}')
        self.align = net.size_multiple * opt['scale'] // math.gcd(net.size_multiple, opt['scale'])
        if self.tile_opt['tile_size'] is not None:
            size, overlap, margin = check_tiling(self.tile_opt['tile_size'], self.tile_opt['tile_overlap'],
                                                 self.tile_opt['tile_margin'], self.align)
            if overlap == 0:
                raise ValueError('val.tile_overlap must be > 0 with tiled sampling (val.tile_size set)')
            self.tile_opt.update(tile_size=size, tile_overlap=overlap, tile_margin=margin)
        if not self.is_train:
            self._load_rrdb()
        logger = get_root_logger()
        logger.info(f'SRDiff: residual x0 = 2 * res_rescale * (HR - up(LR)) with {self.srdiff_opt}; encoder '
                    f'{"frozen" if self.freeze_rrdb else "trained"}; sampling tiles: '
                    f'{self.tile_opt if self.tile_opt["tile_size"] else "off (whole image)"}; align {self.align}')

    # -- network set-up ----------------------------------------------------------------------------
    def model_to_device(self, net):
        # Freeze before any DistributedDataParallel wrapping: DDP must never expect gradients for them.
        if hasattr(net, 'rrdb_head_parameters'):
            for p in net.rrdb_head_parameters():
                p.requires_grad_(False)  # the RRDB up-sampling head is never run
            if self.freeze_rrdb:
                for p in net.encoder_parameters():
                    p.requires_grad_(False)
        return super().model_to_device(net)

    def init_training_settings(self):
        self._load_rrdb()  # before the EMA copy and the optimizer
        super().init_training_settings()

    def _load_rrdb(self):
        path_opt = self.opt['path']
        path = path_opt.get('pretrain_network_rrdb')
        logger = get_root_logger()
        if path is None:
            if self.is_train and path_opt.get('pretrain_network_g') is None:
                logger.warning('SRDiff: no path.pretrain_network_rrdb: the RRDB encoder starts from random weights'
                               + (' and stays frozen (train.freeze_rrdb)' if self.freeze_rrdb else ''))
            return
        if path_opt.get('pretrain_network_g') is not None:
            logger.info(f'SRDiff: encoder weights come from pretrain_network_g; path.pretrain_network_rrdb {path} '
                        f'is not loaded')
            return
        state = read_rrdb_checkpoint(path, path_opt.get('param_key_rrdb'))
        net = self.get_bare_model(self.net_g)
        loaded = net.load_rrdb_state_dict(state, strict=path_opt.get('strict_load_rrdb', True),
                                          source=f'path.pretrain_network_rrdb {path}')
        logger.info(f'SRDiff: loaded {len(loaded)} RRDB encoder tensors from {path}')

    def setup_optimizers(self):
        """BasicSR's, with one log line for the frozen parameters instead of one warning each."""
        train_opt = self.opt['train']
        net = self.get_bare_model(self.net_g)
        params = [p for p in net.parameters() if p.requires_grad]
        frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
        get_root_logger().info(f'SRDiff: optimising {sum(p.numel() for p in params):,} parameters; {frozen:,} frozen '
                               f'(RRDB encoder{" trunk and" if self.freeze_rrdb else ""} head)')
        optim_opt = dict(train_opt['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_g = self.get_optimizer(optim_type, params, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def model_ema(self, decay=0.999):
        super().model_ema(decay)
        # Frozen weights stay bitwise equal in the EMA copy (decay * w + (1 - decay) * w may round).
        net = self.get_bare_model(self.net_g)
        ema = dict(self.net_g_ema.named_parameters())
        with torch.no_grad():
            for name, p in net.named_parameters():
                if not p.requires_grad:
                    ema[name].copy_(p)

    # -- residual space ----------------------------------------------------------------------------
    def to_residual(self, hr: torch.Tensor, lq_up: torch.Tensor) -> torch.Tensor:
        return to_residual(hr, lq_up, self.srdiff_opt['res_rescale'], self.srdiff_opt['clip_input'])

    def from_residual(self, x0: torch.Tensor, lq_up: torch.Tensor) -> torch.Tensor:
        return from_residual(x0, lq_up, self.srdiff_opt['res_rescale'], self.srdiff_opt['clip_input'])

    # -- training ----------------------------------------------------------------------------------
    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        x0 = self.to_residual(self.gt, self.lq_up)
        inputs = training_inputs(self.schedule, x0, self.attention, self.yoda, None, continuous_noise_level=False)
        t = self.schedule.timesteps.to(x0.device)[inputs['k']]
        eps = self.net_g(inputs['z_in'], self.lq, t)
        l_pix = self.cri_pix(eps, inputs['noise'], inputs['mask'])
        self.apply_loss(l_pix, inputs['mask'], current_iter)

    # -- sampling ----------------------------------------------------------------------------------
    def _padded_inputs(self):
        """lq, lq_up, attention padded (bottom/right) so the HR size is a multiple of ``self.align``."""
        s = self.opt['scale']
        H, W = self.lq_up.shape[2:]
        if (H, W) != (self.lq.shape[2] * s, self.lq.shape[3] * s):
            raise ValueError(f'LR {tuple(self.lq.shape[2:])} x scale {s} does not match the upsampled LR '
                             f'{(H, W)}')
        Hp, Wp = -(-H // self.align) * self.align, -(-W // self.align) * self.align
        lq = _pad(self.lq, (Hp - H) // s, (Wp - W) // s, 'reflect')
        lq_up = _pad(self.lq_up, Hp - H, Wp - W, 'reflect')
        att = self.attention
        if att is not None:
            att = _pad(att, Hp - H, Wp - W, 'replicate')
        return lq, lq_up, att

    @torch.no_grad()
    def sample(self, seed=None, progress=False, callback=None):
        """Super-resolve the fed batch; returns images in [0, 1].

        ``callback(k, z, mask)`` sees the residual-space state of the padded image.
        """
        net = self._sampling_net()
        was_training = net.training
        net.eval()
        generator = self.sampling_generator(seed)
        schedule = self.sample_schedule
        timesteps = schedule.timesteps.to(self.device)
        self.sparse_stats = None
        lq, lq_up, att = self._padded_inputs()
        feats = net.encode(lq)  # once per image, on the whole LR image
        Hp, Wp = lq_up.shape[2:]

        def denoise_tile(z_in, k, box):
            cond = net.project_condition(feats, None if box == (0, Hp, 0, Wp) else box)
            return net.denoise(z_in, timesteps[k], cond)

        net_fn = tiled_net_fn(denoise_tile, Hp, Wp, self.tile_opt['tile_size'], self.tile_opt['tile_overlap'],
                              self.tile_opt['tile_margin'], self.align)
        sparse = self.sparse_options()
        pass_mask = bool(sparse['enabled'] and self.yoda.enabled)
        if pass_mask:  # crops of the active regions, each tiled like the whole image when larger than a tile
            denoise = self.sparse_denoiser(net_fn, sparse, self.align)
        else:
            denoise = net_fn
        clip = (-1.0, 1.0) if self.diffusion_opt['clip_denoised'] else None
        z = sample_loop(denoise, schedule, torch.zeros_like(lq_up), att if self.yoda.enabled else None, self.yoda,
                        generator, clip, self.diffusion_opt['variance'], progress, callback, pass_mask)
        if was_training:
            net.train()
        H, W = self.lq_up.shape[2:]
        return self.from_residual(z, lq_up)[:, :, :H, :W].clamp(0, 1)
