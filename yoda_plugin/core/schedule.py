"""Noise schedules and timestep respacing (DDPM, Ho et al. 2020).

Notation: the paper's Eq. 1 calls the per-step noise variance alpha_t, while
Eq. 6-7 use alpha_t as DDPM's 1 - beta_t. We use standard, consistent DDPM
names everywhere:

    beta_t            per-step noise variance       (paper Eq. 1: alpha_t)
    alpha_t = 1 - beta_t                            (paper Eq. 6-7: alpha_t)
    alphas_cumprod_t = prod_{i<=t} alpha_i          (paper Eq. 2: gamma_t)

Arrays are indexed by the step k = 0..K with k = 0 the clean image
(alphas_cumprod[0] = 1), so index k is the paper's t. ``timesteps[k]`` maps a
step of a (possibly respaced) grid back to the training time step, which is
what the time-dependent mask (Eq. 9) is defined on.
"""
import math
from typing import Optional

import torch

SCHEDULES = ('linear', 'cosine', 'quad')
# What the network predicts (diffusers' ``prediction_type``): the noise eps (DDPM, SR3, SRDiff, the paper) or
# the velocity v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho 2022, Sec. 4). Samplers and YODA work on
# eps either way; :meth:`DiffusionSchedule.noise_from_output` converts.
PREDICTIONS = ('eps', 'v')


def make_beta_schedule(schedule: str,
                       num_timesteps: int,
                       linear_start: float = 1e-4,
                       linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> torch.Tensor:
    """Return betas (float64, shape (T,)) for t = 1..T."""
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f'diffusion.num_timesteps must be a positive integer, got {num_timesteps!r}')
    if schedule == 'linear':
        betas = torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    elif schedule == 'quad':
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)**2
    elif schedule == 'cosine':
        # Nichol & Dhariwal 2021, as used by SRDiff.
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2)**2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f'diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}')
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f'diffusion schedule {schedule!r} gives betas outside (0, 1): '
                         f'check linear_start={linear_start} and linear_end={linear_end}')
    return betas


def space_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """Pick ``num_steps`` training time steps, evenly spaced, ending at T.

    Returns a long tensor ``[0, t_1, ..., t_K]`` with t_K = T and t_k the
    rounded k * T / K (as guided-diffusion's respacing, but 1-based so the last
    sampling step is the last training step).
    """
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f'the number of sampling steps must be an integer in [1, num_timesteps='
                         f'{num_train_timesteps}], got {num_steps!r}')
    k = torch.arange(num_steps + 1, dtype=torch.long)
    return (k * num_train_timesteps + num_steps // 2) // num_steps


class DiffusionSchedule:
    """All per-step quantities of a DDPM, in float64, for steps k = 0..K."""

    def __init__(self, betas: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                 num_train_timesteps: Optional[int] = None, prediction: str = 'eps'):
        if prediction not in PREDICTIONS:
            raise ValueError(f'diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}')
        self.prediction = prediction
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        K = betas.numel()
        self.num_steps = K
        self.num_train_timesteps = int(num_train_timesteps or K)
        if timesteps is None:
            timesteps = torch.arange(K + 1, dtype=torch.long)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        if self.timesteps.numel() != K + 1:
            raise ValueError('timesteps must have one entry per step plus t=0')

        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([zero, betas])  # betas[0] is unused
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # [0] = 1
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(z_{k-1} | z_k, z_0): DDPM Eq. 6-7.
        denom = 1.0 - self.alphas_cumprod
        denom[0] = 1.0  # k = 0 has no posterior; avoid 0/0
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / denom
        # The k = 1 posterior variance is 0: clip its log as DDPM does.
        clipped = self.posterior_variance.clone()
        clipped[:2] = self.posterior_variance[2] if K > 1 else self.betas[1]
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / denom
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / denom
        self._device_cache = {}

    @classmethod
    def from_options(cls, schedule: str = 'linear', num_timesteps: int = 500, prediction: str = 'eps',
                     **kwargs) -> 'DiffusionSchedule':
        return cls(make_beta_schedule(schedule, num_timesteps, **kwargs), prediction=prediction)

    def respace(self, num_steps: int) -> 'DiffusionSchedule':
        """A schedule with ``num_steps`` steps whose alphas_cumprod are a subset of ours.

        Training uses T_train steps; sampling may use T_eval < T_train steps
        (paper: 500 and 200). New betas follow from the kept alphas_cumprod:
        beta'_k = 1 - abar(t_k) / abar(t_{k-1}). The returned ``timesteps``
        refer to *our* training grid, so masks stay defined on training time.
        """
        if self.num_steps != self.num_train_timesteps:
            raise ValueError('respace a training schedule, not an already respaced one')
        if num_steps == self.num_steps:
            return self
        ts = space_timesteps(self.num_steps, num_steps)
        abar = self.alphas_cumprod[ts]
        betas = 1.0 - abar[1:] / abar[:-1]
        return DiffusionSchedule(betas, ts, self.num_train_timesteps, self.prediction)

    def noise_level(self, k: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_k) (B,), float64: SR3's continuous noise-level input for grid step ``k``."""
        return self.sqrt_alphas_cumprod.to(k.device)[k]

    def train_timestep(self, k: torch.Tensor) -> torch.Tensor:
        """The training time step t_k (B,) long of grid step ``k``: SRDiff's integer time input, Eq. 9's t."""
        return self.timesteps.to(k.device)[k]

    def gather(self, name: str, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)[k]`` shaped (B, 1, 1, ...) in ``like``'s dtype and device."""
        key = (name, like.device)
        table = self._device_cache.get(key)
        if table is None:
            table = getattr(self, name).to(like.device)
            self._device_cache[key] = table
        k = torch.as_tensor(k, device=like.device, dtype=torch.long)
        if k.dim() == 0:
            k = k.expand(like.shape[0])
        out = table[k].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 3: z_k = sqrt(abar_k) z0 + sqrt(1 - abar_k) eps."""
        return (self.gather('sqrt_alphas_cumprod', k, z0) * z0 +
                self.gather('sqrt_one_minus_alphas_cumprod', k, z0) * noise)

    def training_target(self, noise_level: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict for z_t = g z0 + sqrt(1 - g^2) eps at noise level g = sqrt(abar)
        (B,): eps itself, or v = g eps - sqrt(1 - g^2) z0."""
        if self.prediction == 'eps':
            return noise
        g = _per_sample(noise_level, z0)
        return g * noise - (1 - g * g).sqrt() * z0

    def noise_from_output(self, output: torch.Tensor, z_t: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps of a network ``output`` for ``z_t`` at noise level g (B,): the output itself
        (``prediction: eps``), or eps = g v + sqrt(1 - g^2) z_t (``prediction: v``)."""
        if self.prediction == 'eps':
            return output
        g = _per_sample(noise_level, z_t)
        return g * output + (1 - g * g).sqrt() * z_t

    def __repr__(self) -> str:
        return (f'DiffusionSchedule(steps={self.num_steps}, train_timesteps={self.num_train_timesteps}, '
                f'alphas_cumprod[K]={float(self.alphas_cumprod[-1]):.3g}, prediction={self.prediction})')


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor as (B, 1, 1, ...) in ``like``'s dtype and device."""
    return torch.as_tensor(value, device=like.device).to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def schedule_from_options(opt: dict) -> DiffusionSchedule:
    """Build a training schedule from a ``diffusion`` option dict."""
    known = {'schedule', 'num_timesteps', 'linear_start', 'linear_end', 'cosine_s', 'prediction'}
    kwargs = {k: opt[k] for k in known if k in opt}
    return DiffusionSchedule.from_options(**kwargs)
