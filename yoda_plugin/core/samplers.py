"""Samplers: reverse-diffusion update rules with one interface, and the loop that runs them.

A sampler works on a grid of K steps k = K..1 taken from the training
schedule (:meth:`DiffusionSchedule.respace`): ``sampler.schedule.timesteps[k]``
is the training time step of grid step k, which is what the network's time
input (see :mod:`yoda_plugin.core.adapters`) and the YODA mask (Eq. 9) use.
``sampler.step(eps, k, z_k, noise)`` returns ``(z_{k-1}, x0_hat)`` given the
network's noise prediction ``eps`` for z_k:

* :class:`DDPMSampler`: ancestral sampling (paper Eq. 6-7, 12), the paper's
  sampler (T_eval = 200 steps).
* :class:`DDIMSampler`: Song et al. 2021, Eq. 12 of that paper, with ``eta``
  (0: deterministic; 1: DDPM's per-step mean and variance).
* :class:`DPMSolverSampler`: DPM-Solver++(2M), Lu et al. 2022, the multistep
  second-order solver in data (x0) prediction; first order on the first and
  the last step, deterministic.

:class:`yoda_plugin.core.yoda.YODASampler` wraps any of them with the YODA
blend (Eq. 11, 13, 14); :func:`sample` runs either from pure noise to z_0.
"""
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch

from .schedule import DiffusionSchedule

VARIANCE_TYPES = ('posterior', 'beta')
ClipRange = Optional[Tuple[float, float]]


def predict_start_from_noise(schedule: DiffusionSchedule, z_t: torch.Tensor, k: torch.Tensor,
                             eps: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 3: z0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (schedule.gather('sqrt_recip_alphas_cumprod', k, z_t) * z_t -
            schedule.gather('sqrt_recipm1_alphas_cumprod', k, z_t) * eps)


def predict_noise_from_start(schedule: DiffusionSchedule, z_t: torch.Tensor, k: torch.Tensor,
                             z0: torch.Tensor) -> torch.Tensor:
    """Eq. 3 solved for eps: the noise that takes ``z0`` to ``z_t`` at step k."""
    return ((schedule.gather('sqrt_recip_alphas_cumprod', k, z_t) * z_t - z0) /
            schedule.gather('sqrt_recipm1_alphas_cumprod', k, z_t))


def q_posterior(schedule: DiffusionSchedule, z0: torch.Tensor, z_t: torch.Tensor,
                k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of q(z_{k-1} | z_k, z0); with unclipped z0 the mean is the paper's Eq. 6."""
    mean = (schedule.gather('posterior_mean_coef1', k, z_t) * z0 +
            schedule.gather('posterior_mean_coef2', k, z_t) * z_t)
    return mean, schedule.gather('posterior_log_variance_clipped', k, z_t)


def _not_last(k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (k > 1).to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class Sampler:
    """Base class: the grid, the x0 prediction and the interface every sampler shares.

    ``schedule`` is the *training* schedule; ``steps`` the number of sampling
    steps K (respaced as guided-diffusion's ``respace.py``, ending at T).
    ``clip_range`` clips the predicted x0 (SR3's and SRDiff's
    ``clip_denoised``). ``stochastic`` samplers need a Gaussian ``noise`` draw
    per step; deterministic ones ignore it.
    """
    name = 'base'
    stochastic = True
    config_fields = ()  # the fields of SamplerConfig (beyond type and steps) this sampler takes

    @classmethod
    def from_config(cls, config: 'SamplerConfig', schedule: DiffusionSchedule, steps: Optional[int],
                    clip_range: ClipRange, variance: str) -> 'Sampler':
        """The sampler of a ``val.sampler`` section (``variance``: the diffusion section's DDPM variance)."""
        return cls(schedule, steps, clip_range, **{name: getattr(config, name) for name in cls.config_fields})

    def __init__(self, schedule: DiffusionSchedule, steps: Optional[int] = None, clip_range: ClipRange = (-1.0, 1.0)):
        self.schedule = schedule.respace(schedule.num_steps if steps is None else steps)
        self.clip_range = clip_range
        self.reset()

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def reset(self):
        """Forget any state of a previous run (multistep history)."""

    def predict_x0(self, eps: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x0 = predict_start_from_noise(self.schedule, z, k, eps)
        return x0 if self.clip_range is None else x0.clamp(*self.clip_range)

    def noise_std(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the noise a step from k adds (0 for deterministic samplers)."""
        return torch.zeros_like(self.schedule.gather('betas', k, like))

    def step(self, eps: torch.Tensor, k: torch.Tensor, z: torch.Tensor,
             noise: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f'{type(self).__name__} must implement step()')

    def __repr__(self) -> str:
        return f'{type(self).__name__}(steps={self.num_steps}, clip={self.clip_range})'


class DDPMSampler(Sampler):
    """Ancestral sampling: z_{k-1} ~ N(mu(x0_hat, z_k), sigma_k^2) (Eq. 6-7, 12).

    ``variance='posterior'`` (SR3's code) uses the DDPM posterior variance,
    ``'beta'`` the literal Eq. 7 (beta_k). The last step adds no noise.
    """
    name = 'ddpm'

    @classmethod
    def from_config(cls, config, schedule, steps, clip_range, variance):
        return cls(schedule, steps, clip_range, variance)

    def __init__(self, schedule, steps=None, clip_range=(-1.0, 1.0), variance: str = 'posterior'):
        if variance not in VARIANCE_TYPES:
            raise ValueError(f'variance must be one of {VARIANCE_TYPES}, got {variance!r}')
        self.variance = variance
        super().__init__(schedule, steps, clip_range)

    def noise_std(self, k, like):
        if self.variance == 'posterior':
            return (0.5 * self.schedule.gather('posterior_log_variance_clipped', k, like)).exp()
        return self.schedule.gather('betas', k, like).sqrt()

    def step(self, eps, k, z, noise):
        x0 = self.predict_x0(eps, k, z)
        mean, _ = q_posterior(self.schedule, x0, z, k)
        return mean + _not_last(k, z) * self.noise_std(k, z) * noise, x0  # Eq. 12


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, Eq. 12): z_{k-1} = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps' + s noise.

    s = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar')) with
    abar' = abar_{k-1}; eps' is recomputed from the clipped x0 (as
    guided-diffusion does), so eta = 1 gives DDPM's posterior mean and variance.
    """
    name = 'ddim'
    config_fields = ('eta', )

    def __init__(self, schedule, steps=None, clip_range=(-1.0, 1.0), eta: float = 0.0):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f'DDIM eta must be a number in [0, 1], got {eta!r}')
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        super().__init__(schedule, steps, clip_range)

    def noise_std(self, k, like):
        abar = self.schedule.gather('alphas_cumprod', k, like)
        abar_prev = self.schedule.gather('alphas_cumprod_prev', k, like)
        return self.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()

    def step(self, eps, k, z, noise):
        x0 = self.predict_x0(eps, k, z)
        eps = predict_noise_from_start(self.schedule, z, k, x0)
        abar_prev = self.schedule.gather('alphas_cumprod_prev', k, z)
        sigma = self.noise_std(k, z)
        out = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma * sigma).clamp(min=0).sqrt() * eps
        if self.stochastic:
            out = out + _not_last(k, z) * sigma * noise
        return out, x0


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), deterministic, x0 (data) prediction.

    With lambda = log(sqrt(abar) / sqrt(1 - abar)), h = lambda_{k-1} - lambda_k:
    z_{k-1} = (sigma_{k-1} / sigma_k) z_k - alpha_{k-1} (e^{-h} - 1) D, where
    D = x0_k (first order: the first step, and the last one, which lands on
    sigma = 0 and returns x0_k) or D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k+1}
    with r = h_{k+1} / h_k.
    """
    name = 'dpmpp_2m'
    stochastic = False

    def reset(self):
        self._previous = None  # (k, x0) of the last step

    def _lambda(self, k: int) -> float:
        abar = float(self.schedule.alphas_cumprod[k])
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    def step(self, eps, k, z, noise):
        x0 = self.predict_x0(eps, k, z)
        step = int(k.flatten()[0])
        if step == 1:  # sigma_0 = 0: the solver's last step is its x0 prediction
            self._previous = None
            return x0, x0
        lam, lam_prev = self._lambda(step), self._lambda(step - 1)
        h = lam_prev - lam
        data = x0
        if self._previous is not None and self._previous[0] == step + 1:
            r = (lam - self._lambda(step + 1)) / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._previous[1]
        self._previous = (step, x0)
        s = self.schedule
        sigma_ratio = float(s.sqrt_one_minus_alphas_cumprod[step - 1] / s.sqrt_one_minus_alphas_cumprod[step])
        alpha_prev = float(s.sqrt_alphas_cumprod[step - 1])
        return sigma_ratio * z - (alpha_prev * math.expm1(-h)) * data, x0


SAMPLERS = {'ddpm': DDPMSampler, 'ddim': DDIMSampler, 'dpmpp_2m': DPMSolverSampler}


@dataclass
class SamplerConfig:
    """The ``val.sampler`` section: ``type`` (ddpm | ddim | dpmpp_2m), ``steps`` (K; null: the
    option file's ``diffusion.sample_steps``), ``eta`` (DDIM only)."""
    type: str = 'ddpm'
    steps: Optional[int] = None
    eta: float = 0.0

    def __post_init__(self):
        if self.type not in SAMPLERS:
            raise ValueError(f'val.sampler.type must be one of {sorted(SAMPLERS)}, got {self.type!r}')
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f'val.sampler.steps must be a positive integer (null: diffusion.sample_steps), '
                             f'got {self.steps!r}')
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0 <= self.eta <= 1:
            raise ValueError(f'val.sampler.eta must be a number in [0, 1], got {self.eta!r}')
        if self.eta and 'eta' not in SAMPLERS[self.type].config_fields:
            raise ValueError(f'val.sampler.eta is a DDIM option; sampler {self.type!r} takes none')

    @classmethod
    def from_options(cls, opt, where: str = 'val.sampler') -> 'SamplerConfig':
        from .options import build_section
        return build_section(cls, opt, where)

    @classmethod
    def from_spec(cls, spec: str) -> 'SamplerConfig':
        """``TYPE:STEPS[:ETA]`` as command lines write it, e.g. ``ddim:20`` or ``ddim:20:0.5``."""
        parts = spec.split(':')
        try:
            kind, steps, eta = parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
        except (IndexError, ValueError):
            kind = None
        if kind not in SAMPLERS or len(parts) > 3 or (eta and 'eta' not in SAMPLERS[kind].config_fields):
            raise ValueError(f'sampler {spec!r}: expected TYPE:STEPS[:ETA] with TYPE one of {sorted(SAMPLERS)} '
                             '(ETA for ddim only), e.g. ddim:20 or ddim:20:0.5')
        return cls(kind, steps, eta)

    def build(self, schedule: DiffusionSchedule, default_steps: Optional[int] = None,
              clip_range: ClipRange = (-1.0, 1.0), variance: str = 'posterior') -> Sampler:
        steps = self.steps if self.steps is not None else default_steps
        if steps is not None and not 1 <= steps <= schedule.num_steps:
            raise ValueError(f'val.sampler.steps must be in [1, diffusion.num_timesteps={schedule.num_steps}], '
                             f'got {steps}')
        return SAMPLERS[self.type].from_config(self, schedule, steps, clip_range, variance)

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self, steps: int) -> str:
        return f'{self.type}{"(eta=%g)" % self.eta if self.eta else ""}/{steps}'


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``torch.randn_like`` drawn from ``generator`` (on its device) when given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def sample(denoiser: Denoiser, sampler, like: torch.Tensor, generator: Optional[torch.Generator] = None,
           callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
    """Run ``sampler`` from k = K to 0 and return z_0, shaped and typed like ``like``.

    ``denoiser(z_in, k, mask)`` returns the noise prediction for the network
    input ``z_in`` at grid steps ``k`` (B,) long; ``mask`` is the YODA mask of
    that step (None for a plain sampler), which sparse denoisers crop to. A
    :class:`~yoda_plugin.core.yoda.YODASampler` step whose mask is empty calls
    no network. Random numbers: one draw for z_K, then one per step when the
    sampler needs noise, all from ``generator``. ``callback(k, z_{k-1}, mask)``
    sees every step.
    """
    sampler.reset()
    z = randn_like(like, generator)
    initial = getattr(sampler, 'initial_state', None)
    if initial is not None:
        z = initial(z)
    B = like.shape[0]
    steps = range(sampler.num_steps, 0, -1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f'sampling ({sampler.name})', unit='step', leave=False)
    network_input = getattr(sampler, 'network_input', None)
    for k in steps:
        kt = torch.full((B, ), k, dtype=torch.long, device=like.device)
        z_in, mask = network_input(z, kt) if network_input is not None else (z, None)
        eps = None if mask is not None and not bool(mask.any()) else denoiser(z_in, kt, mask)
        noise = randn_like(z, generator) if sampler.stochastic else None
        z, _ = sampler.step(eps, kt, z, noise)
        if callback is not None:
            callback(k, z, mask)
    return z
