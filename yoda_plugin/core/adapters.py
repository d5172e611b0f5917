"""Backbones: one object per diffusion backbone, registered by name in :data:`BACKBONES`.

A backbone adapter is everything the rest of the code needs to know about a
backbone, in one place (the way :data:`~yoda_plugin.core.samplers.SAMPLERS`
holds the samplers):

* its space: ``to_space`` (HR image -> x0) and ``to_image`` (z_0 -> image);
  the mean of the unrefined component ``lr_mean`` (YODA's Eq. 13);
* its network call at a sampling step (``network_output``, which ``net_fn`` /
  ``__call__`` turn into a noise prediction) and at a training step
  (:meth:`NetworkAdapter.training_output`);
* its size multiple (:meth:`NetworkAdapter.size_multiple`), its defaults of
  the ``diffusion`` section (``diffusion_defaults``), its own option section
  (``section`` / ``config``, e.g. ``srdiff``) and the network it drives
  (``network_type``, checked by :meth:`NetworkAdapter.check_network`);
* the BasicSR model class that trains it (``model_type``), so that an option
  file's ``model_type`` names its backbone without importing that class.

A sampler knows grid steps k; a network wants its own time input and
condition. An adapter maps one to the other (as guided-diffusion's
``respace.py`` does for timesteps):

* :class:`SR3Adapter` (image space): x0 = HR in [-1, 1], the unrefined
  component's mean is the upsampled LR image, the network gets the
  continuous noise level sqrt(abar_k) and the upsampled LR as condition.
* :class:`SRDiffAdapter` (residual space, paper Sec. 4.1.2): x0 = the scaled
  residual HR - up(LR), the unrefined mean is 0, the network gets the integer
  training time step t_k (+ ``time_offset``) and the RRDB features of the LR
  image, encoded once per image.

``net_fn(z_in, k, box=None)`` is the noise prediction for the input (or its
crop ``box = (top, bottom, left, right)`` of the whole image, for the tiling
and sparse wrappers of :mod:`.tiling` and :mod:`.sparse`): the network's
output, converted to eps when the network predicts v (``diffusion.prediction``,
:meth:`~yoda_plugin.core.schedule.DiffusionSchedule.noise_from_output`);
``adapter(z_in, k, mask)`` is the denoiser :func:`~yoda_plugin.core.samplers.sample` calls.
Both run under ``amp_dtype`` autocast (None: float32) and return float32, with
``channels_last`` inputs when the network is stored so.

Adding a backbone: subclass :class:`NetworkAdapter`, decorate it with
:func:`register_backbone` (see ``docs/architecture.md``).
"""
import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple, Type, Union

import torch

from .options import build_section, check_bool, is_number

Box = Tuple[int, int, int, int]


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class NetworkAdapter:
    """Shared part: autocast, memory format, the denoiser call; the class attributes describe the backbone."""
    name = ''  # the registry key (DiffusionSR's ``backbone``)
    space = ''
    model_type = ''  # the BasicSR model class that trains it (an option file's model_type)
    network_type = ''  # the network_g.type it drives
    compile_method = 'forward'  # the network method sampling calls per step (what train/val.compile wraps)
    diffusion_defaults: dict = {}  # its defaults of the diffusion section, over DiffusionConfig's
    section: Optional[str] = None  # its own option section, parsed into ``config``
    config: Optional[type] = None

    def __init__(self, net, schedule, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        self.net, self.schedule = net, schedule
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    # -- the backbone, without a network or a batch -------------------------------------------------
    @classmethod
    def size_multiple(cls, net, scale: int) -> int:
        """HR sizes the network accepts are multiples of this (crops and tiles align to it)."""
        raise NotImplementedError(f'{cls.__name__} must implement size_multiple()')

    @classmethod
    def check_network(cls, net, scale: int):
        """Raise ValueError when ``net`` is not the network this backbone drives."""
        if type(net).__name__ != cls.network_type:
            raise ValueError(f'{cls.model_type or cls.__name__} needs network_g.type: {cls.network_type}, got '
                             f'{type(net).__name__}')

    @classmethod
    def parse_options(cls, opt: dict) -> Tuple[object, dict]:
        """The backbone's option section of ``opt`` (None without one) and the adapter keyword arguments it
        gives; raises for settings of other sections the backbone cannot use."""
        if cls.config is None:
            return None, {}
        section = build_section(cls.config, opt.get(cls.section), cls.section)
        return section, section.adapter_options()

    @classmethod
    def for_batch(cls, net, schedule, lq: torch.Tensor, lq_up: torch.Tensor, scale: int, amp_dtype=None,
                  channels_last: bool = False, encode: bool = True, **options) -> 'NetworkAdapter':
        """The adapter of a batch, with one signature for every backbone (``encode``: per-image work for
        sampling, such as SRDiff's LR features; training does not need it)."""
        raise NotImplementedError(f'{cls.__name__} must implement for_batch()')

    # -- a batch --------------------------------------------------------------------------------------
    def training_output(self, inputs: dict) -> torch.Tensor:
        """The network's output (float32; eps or v, as ``inputs['target']``) for the
        :func:`~yoda_plugin.core.yoda.training_inputs` of a training step; ``self.schedule`` is the training
        schedule."""
        raise NotImplementedError(f'{type(self).__name__} must implement training_output()')

    def autocast(self, like: torch.Tensor):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(like.device.type, dtype=self.amp_dtype)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, z_in: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net_fn(z_in, k)

    def net_fn(self, z_in: torch.Tensor, k: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
        """The noise prediction eps at grid step ``k`` (whatever the network predicts)."""
        return self.schedule.noise_from_output(self.network_output(z_in, k, box), z_in, self.schedule.noise_level(k))

    def network_output(self, z_in: torch.Tensor, k: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
        """The network's output (float32) at the sampler's grid step ``k``, for the crop ``box``."""
        raise NotImplementedError(f'{type(self).__name__} must implement network_output()')


BACKBONES: Dict[str, Type[NetworkAdapter]] = {}


def register_backbone(cls: Type[NetworkAdapter]) -> Type[NetworkAdapter]:
    """Class decorator: register a :class:`NetworkAdapter` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, NetworkAdapter)) or not cls.name:
        raise ValueError(f'{cls!r} must be a NetworkAdapter subclass with a name')
    known = BACKBONES.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f'backbone {cls.name!r} is already registered by {known.__module__}.{known.__qualname__}')
    BACKBONES[cls.name] = cls
    return cls


def get_backbone(backbone: Union[str, Type[NetworkAdapter]]) -> Type[NetworkAdapter]:
    """The registered adapter class of a backbone name (an adapter class is returned as it is)."""
    if isinstance(backbone, type) and issubclass(backbone, NetworkAdapter):
        return backbone
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ValueError(f'backbone must be one of {tuple(BACKBONES)}, got {backbone!r}')
    return BACKBONES[backbone]


def backbone_for_model_type(model_type) -> Type[NetworkAdapter]:
    """The backbone an option file's ``model_type`` trains (without importing the model class)."""
    for cls in BACKBONES.values():
        if cls.model_type == model_type:
            return cls
    names = ' or '.join(cls.model_type for cls in BACKBONES.values())
    raise ValueError(f'model_type: {model_type!r} is no diffusion SR model ({names})')


@register_backbone
class SR3Adapter(NetworkAdapter):
    """SR3: ``net(z_t, cond, noise_level)`` with cond = up(LR) in [-1, 1] and noise_level = sqrt(abar_k)."""
    name = 'sr3'
    space = 'image'
    model_type = 'SR3Model'
    network_type = 'SR3UNet'

    def __init__(self, net, schedule, lq_up: torch.Tensor, amp_dtype=None, channels_last=False):
        super().__init__(net, schedule, amp_dtype, channels_last)
        self.cond = lq_up * 2 - 1
        self.lr_mean = self.cond  # Eq. 13: the unrefined component is the noisy upsampled LR image
        self.multiple = self.size_multiple(net, 1)

    @classmethod
    def size_multiple(cls, net, scale):
        return 2**(net.num_levels - 1)

    @classmethod
    def check_network(cls, net, scale):
        if not hasattr(net, 'num_levels'):
            raise ValueError(f'SR3Model needs network_g.type: SR3UNet, got {type(net).__name__}')

    @classmethod
    def for_batch(cls, net, schedule, lq, lq_up, scale, amp_dtype=None, channels_last=False, encode=True, **options):
        if options:
            raise ValueError(f'the sr3 backbone takes no options, got {sorted(options)}')
        return cls(net, schedule, lq_up, amp_dtype, channels_last)

    def training_output(self, inputs):
        # SR3 trains on a continuous noise level drawn between two steps' sqrt(abar).
        return self.predict(inputs['z_in'], inputs['noise_level'], self.cond)

    @staticmethod
    def to_space(hr: torch.Tensor) -> torch.Tensor:
        return hr * 2 - 1

    @staticmethod
    def to_image(z: torch.Tensor) -> torch.Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def predict(self, z_in: torch.Tensor, noise_level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network's output (eps or v) at a given noise level (training draws it continuously)."""
        with self.autocast(z_in):
            out = self.net(self.memory_format(z_in), self.memory_format(cond), noise_level)
        return out.float()

    def network_output(self, z_in, k, box=None):
        cond = self.cond if box is None else self.cond[..., box[0]:box[1], box[2]:box[3]]
        return self.predict(z_in, self.schedule.noise_level(k).to(z_in.dtype), cond)


@dataclass
class SRDiffConfig:
    """The ``srdiff`` section: SRDiff's residual scaling (``res_rescale``) and input clipping (``clip_input``)."""
    res_rescale: float = 2.0
    clip_input: bool = True

    def __post_init__(self):
        r = self.res_rescale
        if not is_number(r) or not r > 0:
            raise ValueError(f'srdiff.res_rescale must be a positive number, got {r!r}')
        check_bool(self.clip_input, 'srdiff.clip_input')

    @classmethod
    def from_options(cls, opt: Optional[dict]) -> 'SRDiffConfig':
        return build_section(cls, opt, 'srdiff')

    def as_dict(self) -> dict:
        return asdict(self)

    def adapter_options(self) -> dict:
        return {'res_rescale': self.res_rescale, 'clip_input': self.clip_input}


@register_backbone
class SRDiffAdapter(NetworkAdapter):
    """SRDiff: ``net.denoise(z_t, t, cond)`` with t = t_k + ``time_offset`` and cond from the RRDB features.

    Residuals: x0 = (HR - up(LR)) * 2 * res_rescale, clipped to [-1, 1] when
    ``clip_input`` (SRDiff's img2res); the image is up(LR) + x0 / (2 * res_rescale)
    (SRDiff's res2img). This is the only copy of that arithmetic.
    """
    name = 'srdiff'
    space = 'residual'
    model_type = 'SRDiffModel'
    network_type = 'SRDiffNet'
    compile_method = 'denoise'  # sampling encodes once and denoises per step; forward calls denoise too
    diffusion_defaults = {'schedule': 'cosine', 'num_timesteps': 100, 'sample_steps': None,
                          'continuous_noise_level': False}
    section = 'srdiff'
    config = SRDiffConfig

    def __init__(self, net, schedule, lq: torch.Tensor, lq_up: torch.Tensor, scale: int, amp_dtype=None,
                 channels_last=False, res_rescale: float = 2.0, clip_input: bool = True, time_offset: int = 0,
                 encode: bool = True):
        super().__init__(net, schedule, amp_dtype, channels_last)
        self.lq, self.lq_up = lq, lq_up
        self.res_scale, self.clip_input, self.time_offset = 2.0 * float(res_rescale), clip_input, time_offset
        self.lr_mean = torch.zeros_like(lq_up)  # Sec. 4.1.2: z^LR has mean 0 in residual space
        self.multiple = self.size_multiple(net, scale)
        self.size = tuple(lq_up.shape[-2:])
        self.feats = None
        if encode:
            with self.autocast(lq):
                self.feats = [f.float() for f in net.encode(self.memory_format(lq))]  # once per image

    @classmethod
    def size_multiple(cls, net, scale):
        return lcm(net.size_multiple, scale)

    @classmethod
    def check_network(cls, net, scale):
        super().check_network(net, scale)
        if net.scale != scale:
            raise ValueError(f'network_g.scale={net.scale} differs from the top-level scale={scale}')

    @classmethod
    def parse_options(cls, opt):
        if (opt.get('diffusion') or {}).get('continuous_noise_level'):
            raise ValueError('diffusion.continuous_noise_level must be false for SRDiffModel: SRDiff\'s network embeds '
                             'integer time steps, not a continuous noise level')
        return super().parse_options(opt)

    @classmethod
    def for_batch(cls, net, schedule, lq, lq_up, scale, amp_dtype=None, channels_last=False, encode=True, **options):
        return cls(net, schedule, lq, lq_up, scale, amp_dtype, channels_last, encode=encode, **options)

    def training_output(self, inputs):
        # The whole network (encoder included) at the integer training steps of the drawn grid steps.
        return self.predict(inputs['z_in'], self.schedule.train_timestep(inputs['k']))

    def to_space(self, hr: torch.Tensor) -> torch.Tensor:
        x0 = (hr - self.lq_up) * self.res_scale
        return x0.clamp(-1.0, 1.0) if self.clip_input else x0

    def to_image(self, z: torch.Tensor) -> torch.Tensor:
        if self.clip_input:
            z = z.clamp(-1.0, 1.0)
        return (self.lq_up + z / self.res_scale).clamp(0, 1)

    def predict(self, z_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The whole network (encoder included) at integer training steps ``t`` (training)."""
        with self.autocast(z_in):
            eps = self.net(self.memory_format(z_in), self.memory_format(self.lq), t + self.time_offset)
        return eps.float()

    def network_output(self, z_in, k, box=None):
        whole = box is None or tuple(box) == (0, self.size[0], 0, self.size[1])
        with self.autocast(z_in):
            cond = self.net.project_condition(self.feats, None if whole else box)
            eps = self.net.denoise(self.memory_format(z_in), self.schedule.train_timestep(k) + self.time_offset,
                                   self.memory_format(cond))
        return eps.float()
