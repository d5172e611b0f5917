"""YODA: training inputs (Eq. 3, 9-11) and the masked blend around any sampler (Eq. 11, 13, 14).

Works for an image-space model (SR3: the unrefined component z^LR has mean x,
the upsampled LR image) and a residual-space model (SRDiff: mean 0, paper
Sec. 4.1.2): the caller passes ``lr_mean`` accordingly.

Choices where the paper is ambiguous (see docs/method.md, "Ambiguities"):

* Noise of z^LR_{k-1} (Eq. 13), ``lr_noise``:
  ``'marginal'`` draws it from the forward marginal q(z_{k-1} | x) =
  N(sqrt(abar_{k-1}) x, (1 - abar_{k-1}) I) with the step's fresh noise, as
  RePaint does for known regions: a pixel that enters the mask at step k
  carries exactly the noise level the network saw for that k in training.
  ``'fixed'`` uses the same marginal with *one* noise draw per image (the
  draw of z_K): the unrefined part follows the deterministic forward path
  sqrt(abar_k) x + sqrt(1 - abar_k) eps_0, so for a deterministic sampler
  the whole run is a function of z_K, and a pixel entering the mask sits on
  the DDIM trajectory of (x, eps_0). ``'posterior'`` is the literal Eq. 13:
  N(x, Sigma_theta) with the sampler's own step variance (0 for a
  deterministic sampler); a late pixel then holds an almost clean value the
  network never saw at that noise level. ``'auto'`` (default): ``marginal``
  for stochastic samplers (DDPM, DDIM with eta > 0), ``fixed`` for
  deterministic ones.
* Network input (Eq. 11). ``mask_network_input=True`` (default) feeds
  M(t) * z_t to the network both in sampling and in training, so training
  matches sampling; ``False`` feeds z_t unmasked in both.
* One Gaussian draw per step serves both components: M(t) and 1 - M(t) are
  disjoint, so each pixel still gets independent noise, and sampling with
  A = 1 is bit-identical to the wrapped sampler alone for the same generator.
* Outside the mask the network's prediction is replaced by the noise of the
  unrefined component, eps^LR = (z_k - sqrt(abar_k) x) / sqrt(1 - abar_k), so
  the sampler's x0 prediction there is x: a multistep solver's history then
  holds x for a pixel that was not refined yet (its trajectory so far is the
  one of x), never a prediction made on a zeroed input.
"""
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .mask import YODAMask, check_lower_bound
from .options import build_section
from .samplers import randn_like
from .schedule import DiffusionSchedule

LR_NOISE_MODES = ('auto', 'marginal', 'fixed', 'posterior')


@dataclass
class YODAConfig:
    """The ``yoda`` section of an option file. ``enabled: false`` (or no section) is vanilla diffusion."""
    enabled: bool = True
    lower_bound: float = 0.4
    lr_noise: str = 'auto'
    mask_network_input: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f'yoda.enabled must be true or false, got {self.enabled!r}')
        self.lower_bound = check_lower_bound(self.lower_bound)
        if self.lr_noise not in LR_NOISE_MODES:
            raise ValueError(f'yoda.lr_noise must be one of {LR_NOISE_MODES}, got {self.lr_noise!r}')
        if not isinstance(self.mask_network_input, bool):
            raise ValueError(f'yoda.mask_network_input must be true or false, got {self.mask_network_input!r}')

    @classmethod
    def from_options(cls, opt: Optional[dict], where: str = 'yoda') -> 'YODAConfig':
        """Build from an option dict; ``None`` (no section) means YODA off. An empty section is refused."""
        if opt is None:
            return cls(enabled=False)
        if isinstance(opt, dict) and not opt:
            raise ValueError(f'{where}: the section is empty; write "{where}: {{enabled: true}}" for YODA with the '
                             f'defaults, or remove it (or "enabled: false") for vanilla diffusion')
        return build_section(cls, opt, where)

    def as_dict(self) -> dict:
        return asdict(self)

    def mask(self, attention: Optional[torch.Tensor], num_train_timesteps: int) -> Optional[YODAMask]:
        """The Eq. 9 mask of these maps, or None when YODA is off (the one way the core says "vanilla")."""
        if not self.enabled:
            return None
        if attention is None:
            raise ValueError('YODA is enabled but no attention map was given')
        return YODAMask(attention, self.lower_bound, num_train_timesteps)

    def wrap(self, sampler, attention: Optional[torch.Tensor], lr_mean: torch.Tensor):
        """``sampler`` with the YODA blend (a :class:`YODASampler`), or ``sampler`` itself when YODA is off."""
        mask = self.mask(attention, sampler.schedule.num_train_timesteps)
        if mask is None:
            return sampler
        return YODASampler(sampler, mask, lr_mean, self.lr_noise, self.mask_network_input)


def _rand(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = like.device if generator is None else generator.device
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64).to(like.device)


def training_inputs(schedule: DiffusionSchedule,
                    x0: torch.Tensor,
                    mask: Optional[YODAMask],
                    mask_network_input: bool = True,
                    generator: Optional[torch.Generator] = None,
                    continuous_noise_level: bool = True) -> dict:
    """Everything one training step needs (paper Eq. 3, 9, 10).

    Draws a time step k ~ U{1..K} per sample and the noise eps. With
    ``continuous_noise_level`` (SR3) the noise level sqrt(gamma) is drawn
    uniformly between sqrt(abar_k) and sqrt(abar_{k-1}); otherwise it is
    sqrt(abar_k). ``mask`` (a :class:`YODAMask`, None: vanilla) gives M(t).
    Returns ``z_in`` (the network input, masked as Eq. 11 when
    ``mask_network_input``), ``noise`` (eps), ``target`` (what the network
    learns: eps, or v for ``schedule.prediction == 'v'``), ``mask`` (M(t) or
    None), ``k`` (B,) and ``noise_level`` (B,) sqrt(gamma).
    """
    B = x0.shape[0]
    u = _rand((B, ), x0, generator)
    k = (u * schedule.num_steps).long().clamp_(0, schedule.num_steps - 1) + 1
    hi = schedule.sqrt_alphas_cumprod.to(x0.device)[k - 1]
    lo = schedule.sqrt_alphas_cumprod.to(x0.device)[k]
    noise_level = lo + (hi - lo) * _rand((B, ), x0, generator) if continuous_noise_level else lo
    noise = randn_like(x0, generator)
    gamma = noise_level.view(-1, *([1] * (x0.dim() - 1)))
    z_t = gamma.to(x0.dtype) * x0 + (1 - gamma * gamma).sqrt().to(x0.dtype) * noise
    m = None
    if mask is not None:
        m = mask.at(schedule.train_timestep(k), x0.dtype)
        if mask_network_input:
            z_t = z_t * m  # Eq. 11, applied in training as in sampling
    target = schedule.training_target(noise_level, x0, noise)
    return {'z_in': z_t, 'noise': noise, 'target': target, 'mask': m, 'k': k,
            'noise_level': noise_level.to(x0.dtype)}


class YODASampler:
    """The YODA blend around any sampler: refine inside M(t), keep noisy LR outside (Eq. 11, 13, 14).

    Same interface as the wrapped sampler (``schedule``, ``num_steps``,
    ``stochastic``, ``reset``, ``step``), plus ``initial_state`` (z_K: noise
    where M(T) = 1, noisy LR elsewhere) and ``network_input`` (Eq. 11 and the
    mask of the step), which :func:`~yoda_plugin.core.samplers.sample` calls.
    """

    def __init__(self, sampler, mask: YODAMask, lr_mean: torch.Tensor, lr_noise: str = 'auto',
                 mask_network_input: bool = True):
        if lr_noise not in LR_NOISE_MODES:
            raise ValueError(f'yoda.lr_noise must be one of {LR_NOISE_MODES}, got {lr_noise!r}')
        if mask.num_train_timesteps != sampler.schedule.num_train_timesteps:
            raise ValueError(f'the mask is defined on T={mask.num_train_timesteps} training steps, the sampler on '
                             f'T={sampler.schedule.num_train_timesteps}')
        if tuple(mask.shape[-2:]) != tuple(lr_mean.shape[-2:]) or mask.shape[0] != lr_mean.shape[0]:
            raise ValueError(f'attention map {tuple(mask.shape)} does not match the image {tuple(lr_mean.shape)}')
        self.sampler, self.mask, self.lr_mean = sampler, mask.to(lr_mean.device), lr_mean
        if lr_noise == 'auto':
            lr_noise = 'marginal' if sampler.stochastic else 'fixed'
        self.lr_noise, self.mask_network_input = lr_noise, mask_network_input
        self.schedule, self.name = sampler.schedule, sampler.name
        self.stochastic = sampler.stochastic or lr_noise == 'marginal'
        self._eps0 = None
        self._cached = (None, None)  # (k, M(k)): network_input and step of one step share it

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def reset(self):
        self.sampler.reset()
        self._eps0 = None

    def mask_at(self, k: torch.Tensor) -> torch.Tensor:
        """M of grid step k: Eq. 9 at its training time step."""
        key = tuple(k.tolist())
        if self._cached[0] != key:
            self._cached = (key, self.mask.at(self.schedule.train_timestep(k), self.lr_mean.dtype))
        return self._cached[1]

    def unrefined(self, k: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """z^LR at grid step k (Eq. 13), for the mode in ``lr_noise``."""
        if self.lr_noise == 'fixed':
            return self.schedule.q_sample(self.lr_mean, k, self._eps0)
        if self.lr_noise == 'marginal':
            return self.schedule.q_sample(self.lr_mean, k, noise)  # q(z_k | x)
        # Literal Eq. 13: N(x, Sigma_theta) with the variance of the step that arrives at k.
        std = self.sampler.noise_std(k + 1, self.lr_mean)
        if noise is None:
            return self.lr_mean + 0 * std
        return self.lr_mean + (k > 0).to(noise.dtype).view(-1, 1, 1, 1) * std * noise

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        self._eps0 = noise
        K = torch.full((noise.shape[0], ), self.num_steps, dtype=torch.long, device=noise.device)
        if self.lr_noise == 'posterior':
            z_lr = self.lr_mean + self.sampler.noise_std(K, noise) * noise
        else:
            z_lr = self.schedule.q_sample(self.lr_mean, K, noise)
        return torch.where(self.mask_at(K).bool(), noise, z_lr)

    def network_input(self, z: torch.Tensor, k: torch.Tensor):
        mask = self.mask_at(k)
        return (z * mask if self.mask_network_input else z), mask  # Eq. 11

    def step(self, eps: Optional[torch.Tensor], k: torch.Tensor, z: torch.Tensor, noise: Optional[torch.Tensor]):
        mask = self.mask_at(k).bool()
        s = self.schedule
        eps_lr = ((z - s.gather('sqrt_alphas_cumprod', k, z) * self.lr_mean) /
                  s.gather('sqrt_one_minus_alphas_cumprod', k, z))
        eps = eps_lr if eps is None else torch.where(mask, eps, eps_lr)
        z_sr, x0 = self.sampler.step(eps, k, z, noise)  # Eq. 12 (or the sampler's own rule)
        return torch.where(mask, z_sr, self.unrefined(k - 1, noise)), x0  # Eq. 14

    def __repr__(self) -> str:
        return f'YODASampler({self.sampler!r}, lr_noise={self.lr_noise!r})'
