"""Backbone adapters: how a backbone's network is called at a sampling step, in one place per backbone.

A sampler knows grid steps k; a network wants its own time input and
condition. An adapter maps one to the other (as guided-diffusion's
``respace.py`` does for timesteps) and knows the backbone's space:

* :class:`SR3Adapter` (image space): x0 = HR in [-1, 1], the unrefined
  component's mean is the upsampled LR image, the network gets the
  continuous noise level sqrt(abar_k) and the upsampled LR as condition.
* :class:`SRDiffAdapter` (residual space, paper Sec. 4.1.2): x0 = the scaled
  residual HR - up(LR), the unrefined mean is 0, the network gets the integer
  training time step t_k (+ ``time_offset``) and the RRDB features of the LR
  image, encoded once per image.

``net_fn(z_in, k, box=None)`` is the noise prediction for the input (or its
crop ``box = (top, bottom, left, right)`` of the whole image, for the tiling
and sparse wrappers of :mod:`.tiling` and :mod:`.sparse`); ``adapter(z_in, k,
mask)`` is the denoiser :func:`~yoda_plugin.core.samplers.sample` calls.
Both run under ``amp_dtype`` autocast (None: float32) and return float32, with
``channels_last`` inputs when the network is stored so.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch

Box = Tuple[int, int, int, int]


class NetworkAdapter:
    """Shared part: autocast, memory format, the denoiser call."""
    space = ''

    def __init__(self, net, schedule, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        self.net, self.schedule = net, schedule
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    def autocast(self, like: torch.Tensor):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(like.device.type, dtype=self.amp_dtype)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, z_in: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net_fn(z_in, k)

    def net_fn(self, z_in: torch.Tensor, k: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
        raise NotImplementedError(f'{type(self).__name__} must implement net_fn()')


class SR3Adapter(NetworkAdapter):
    """SR3: ``net(z_t, cond, noise_level)`` with cond = up(LR) in [-1, 1] and noise_level = sqrt(abar_k)."""
    space = 'image'

    def __init__(self, net, schedule, lq_up: torch.Tensor, amp_dtype=None, channels_last=False):
        super().__init__(net, schedule, amp_dtype, channels_last)
        self.cond = lq_up * 2 - 1
        self.lr_mean = self.cond  # Eq. 13: the unrefined component is the noisy upsampled LR image
        self.multiple = 2**(net.num_levels - 1)

    @staticmethod
    def to_space(hr: torch.Tensor) -> torch.Tensor:
        return hr * 2 - 1

    @staticmethod
    def to_image(z: torch.Tensor) -> torch.Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def predict(self, z_in: torch.Tensor, noise_level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network at a given noise level (training draws it continuously)."""
        with self.autocast(z_in):
            eps = self.net(self.memory_format(z_in), self.memory_format(cond), noise_level)
        return eps.float()

    def net_fn(self, z_in, k, box=None):
        cond = self.cond if box is None else self.cond[..., box[0]:box[1], box[2]:box[3]]
        return self.predict(z_in, self.schedule.noise_level(k).to(z_in.dtype), cond)


class SRDiffAdapter(NetworkAdapter):
    """SRDiff: ``net.denoise(z_t, t, cond)`` with t = t_k + ``time_offset`` and cond from the RRDB features.

    Residuals: x0 = (HR - up(LR)) * 2 * res_rescale, clipped to [-1, 1] when
    ``clip_input`` (SRDiff's img2res); the image is up(LR) + x0 / (2 * res_rescale).
    """
    space = 'residual'

    def __init__(self, net, schedule, lq: torch.Tensor, lq_up: torch.Tensor, scale: int, amp_dtype=None,
                 channels_last=False, res_rescale: float = 2.0, clip_input: bool = True, time_offset: int = 0,
                 encode: bool = True):
        super().__init__(net, schedule, amp_dtype, channels_last)
        self.lq, self.lq_up = lq, lq_up
        self.res_scale, self.clip_input, self.time_offset = 2.0 * float(res_rescale), clip_input, time_offset
        self.lr_mean = torch.zeros_like(lq_up)  # Sec. 4.1.2: z^LR has mean 0 in residual space
        self.multiple = net.size_multiple * scale // math.gcd(net.size_multiple, scale)
        self.size = tuple(lq_up.shape[-2:])
        self.feats = None
        if encode:
            with self.autocast(lq):
                self.feats = [f.float() for f in net.encode(self.memory_format(lq))]  # once per image

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

    def net_fn(self, z_in, k, box=None):
        whole = box is None or tuple(box) == (0, self.size[0], 0, self.size[1])
        with self.autocast(z_in):
            cond = self.net.project_condition(self.feats, None if whole else box)
            eps = self.net.denoise(self.memory_format(z_in), self.schedule.train_timestep(k) + self.time_offset,
                                   self.memory_format(cond))
        return eps.float()
