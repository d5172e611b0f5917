"""SRDiff (Li et al. 2022) with and without YODA, as a BasicSR model.

SRDiff diffuses the residual between the HR image and the bicubic-upsampled
LR image, conditioned on the features of a pretrained, frozen RRDB LR
encoder (``SRDiffNet``). With YODA the unrefined component z^LR has mean 0
in this residual space (paper Sec. 4.1.2).

Residual scaling, as SRDiff's ``img2res`` / ``res2img`` (``res: true``,
``res_rescale: 2``, ``clip_input: true``): SRDiff works on images in
[-1, 1] and diffuses ``x0 = (HR - up(LR)) * res_rescale`` clipped to [-1, 1];
on our [0, 1] images that is ``x0 = 2 * res_rescale * (HR - up(LR))``
(= 4 (HR - up) for res_rescale 2): residuals beyond +-0.25 of the [0, 1]
range are clipped in training (rare: bicubic misses a quarter of the range
only at the strongest edges). Each reverse step clips the predicted x0 to
[-1, 1] (SRDiff's ``clip_denoised``), and the output is
``up(LR) + clip(z_0, -1, 1) / (2 * res_rescale)``, clamped to [0, 1].

Everything else (sampling through the one pipeline with ``val.sampler``,
``val.sparse``, tiles, ``train/val.amp``, ``channels_last`` and ``compile``;
validation with reports, EMA, atomic checkpoints, NaN policy, ranks-in-sync
checks) comes from :class:`~.base_model.DiffusionSRModel`. What is SRDiff's:

* the network call: ``net_g(z_t, lq, t)`` with integer training time steps t
  (SRDiff embeds t, not SR3's continuous noise level), so
  ``diffusion.continuous_noise_level`` must be false; defaults are SRDiff's:
  cosine schedule, T = 100, sampling on all T steps. Sampling encodes the LR
  image once and runs ``net.denoise`` per step (the method ``compile`` wraps);
  see :class:`~yoda_plugin.core.adapters.SRDiffAdapter` (the backbone: its residual arithmetic, network calls,
  defaults and the ``srdiff`` section).
* the RRDB encoder: loaded from ``path.pretrain_network_rrdb`` (a BasicSR
  RRDBNet checkpoint, ``weights_only=True``) and frozen unless
  ``train.freeze_rrdb: false``. Its unused up-sampling head is always frozen.
"""
import os

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from .base_model import DiffusionSRModel


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
class SRDiffModel(DiffusionSRModel):
    """SRDiff residual diffusion; YODA on or off via the ``yoda`` section.

    Options on top of :class:`~.base_model.DiffusionSRModel`:
        network_g: ``type: SRDiffNet`` (see ``yoda_plugin/archs/srdiff_arch.py``).
        srdiff: res_rescale (2.0), clip_input (true): SRDiff's residual scaling.
        diffusion: SRDiff defaults (cosine, T = 100, sample_steps = T); continuous_noise_level must be false.
        path.pretrain_network_rrdb: BasicSR RRDBNet checkpoint for the encoder
            (used when training starts without ``pretrain_network_g``; a full
            SRDiff checkpoint, e.g. when resuming, already holds the encoder).
        path.param_key_rrdb: entry of that file (default: params_ema, else params).
        path.strict_load_rrdb: all keys and shapes must match (default true).
        train.freeze_rrdb: keep the encoder fixed (default true, SRDiff's fix_rrdb).
    """
    backbone = 'srdiff'  # residual space, network calls, defaults, the srdiff section: core.adapters.SRDiffAdapter
    frozen_note = 'RRDB encoder head, and its trunk with train.freeze_rrdb'
    # Option keys beyond BasicSR's and DiffusionSRModel's (read by tests/test_options.py).
    extra_option_keys = {'': {'srdiff'}, 'train': {'freeze_rrdb'}}

    def __init__(self, opt):
        super().__init__(opt)
        if not self.is_train:
            self._load_rrdb()

    def parse_options(self, opt):
        self.freeze_rrdb = (opt.get('train') or {}).get('freeze_rrdb', True)
        if not isinstance(self.freeze_rrdb, bool):
            raise ValueError(f'train.freeze_rrdb must be true or false, got {self.freeze_rrdb!r}')
        super().parse_options(opt)

    def describe(self) -> str:
        return (f'; SRDiff: residual x0 = 2 * res_rescale * (HR - up(LR)) with {self.srdiff.as_dict()}, encoder '
                f'{"frozen" if self.freeze_rrdb else "trained"}')

    # -- network set-up ----------------------------------------------------------------------------
    def prepare_network(self, net):
        # Freeze before any DistributedDataParallel wrapping: DDP must never expect gradients for them.
        if hasattr(net, 'rrdb_head_parameters'):
            for p in net.rrdb_head_parameters():
                p.requires_grad_(False)  # the RRDB up-sampling head is never run
            if self.freeze_rrdb:
                for p in net.encoder_parameters():
                    p.requires_grad_(False)

    def init_training_settings(self):
        self._load_rrdb()  # before the EMA copy and the optimizer
        super().init_training_settings()

    def _load_rrdb(self):
        load_rrdb_encoder(self.get_bare_model(self.net_g), self.opt['path'],
                          self.opt['path'].get('pretrain_network_g') is not None, self.is_train, self.freeze_rrdb)


def load_rrdb_encoder(net, path_opt: dict, full_checkpoint: bool, is_train: bool = False, frozen: bool = True):
    """``path.pretrain_network_rrdb`` into the encoder of ``net``, unless a full SRDiff checkpoint
    (``full_checkpoint``: ``pretrain_network_g``, a resume) already holds it."""
    path = path_opt.get('pretrain_network_rrdb')
    logger = get_root_logger()
    if path is None:
        if is_train and not full_checkpoint:
            logger.warning('SRDiff: no path.pretrain_network_rrdb: the RRDB encoder starts from random weights'
                           + (' and stays frozen (train.freeze_rrdb)' if frozen else ''))
        return
    if full_checkpoint:
        logger.info(f'SRDiff: encoder weights come from pretrain_network_g; path.pretrain_network_rrdb {path} '
                    f'is not loaded')
        return
    state = read_rrdb_checkpoint(path, path_opt.get('param_key_rrdb'))
    loaded = net.load_rrdb_state_dict(state, strict=path_opt.get('strict_load_rrdb', True),
                                      source=f'path.pretrain_network_rrdb {path}')
    logger.info(f'SRDiff: loaded {len(loaded)} RRDB encoder tensors from {path}')
