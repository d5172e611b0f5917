"""YODA training inputs and masked reverse diffusion (paper Eq. 10-14).

Works for an image-space model (SR3: the unrefined component z^LR has mean x,
the upsampled LR image) and a residual-space model (SRDiff: mean 0, paper
Sec. 4.1.2): the caller passes ``lr_mean`` accordingly.

Choices where the paper is ambiguous (see README, "Ambiguities"):

* Noise level of z^LR_{t-1} (Eq. 13). ``lr_noise='marginal'`` (default) draws
  it from the forward marginal q(z_{t-1} | x) = N(sqrt(abar_{t-1}) x,
  (1 - abar_{t-1}) I), as RePaint does for known regions. A pixel that enters
  the mask at step t then carries exactly the noise level the network saw for
  that t in training. ``lr_noise='posterior'`` is the literal Eq. 13:
  N(x, Sigma_theta), the one-step reverse variance; a pixel that enters late
  then holds an almost clean value the network never saw at that noise level.
* Network input (Eq. 11). ``mask_network_input=True`` (default) feeds
  M(t) * z_t to the network both in sampling (Eq. 11) and in training, so
  training matches sampling; ``False`` feeds z_t unmasked in both.
* Reverse variance. ``variance='posterior'`` (default, as the SR3 code the
  paper builds on) uses the DDPM posterior variance; ``'beta'`` uses beta_t, the
  literal Eq. 7.
* One Gaussian draw per step serves both components: M(t) and 1 - M(t) are
  disjoint, so each pixel still gets independent noise, and sampling with
  YODA off or A = 1 is bit-identical to vanilla DDPM for the same generator.
"""
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Sequence, Tuple

import torch

from .mask import check_attention, check_lower_bound
from .schedule import DiffusionSchedule

LR_NOISE_MODES = ('marginal', 'posterior')
VARIANCE_TYPES = ('posterior', 'beta')


@dataclass
class YODAConfig:
    """The ``yoda`` section of an option file."""
    enabled: bool = True
    lower_bound: float = 0.4
    lr_noise: str = 'marginal'
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
        """Build from an option dict; ``None`` means YODA off. Unknown keys are errors."""
        if opt is None:
            return cls(enabled=False)
        if not isinstance(opt, dict):
            raise ValueError(f'{where} must be a mapping of options, got {type(opt).__name__}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opt) - known)
        if unknown:
            raise ValueError(f'unknown option(s) {", ".join(where + "." + k for k in unknown)}; '
                             f'known: {", ".join(sorted(known))}')
        return cls(**dict(opt))

    def as_dict(self) -> dict:
        return asdict(self)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _rand(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = like.device if generator is None else generator.device
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64).to(like.device)


def training_inputs(schedule: DiffusionSchedule,
                    x0: torch.Tensor,
                    attention: Optional[torch.Tensor],
                    cfg: YODAConfig,
                    generator: Optional[torch.Generator] = None,
                    continuous_noise_level: bool = True) -> dict:
    """Everything one training step needs (paper Eq. 3, 9, 10).

    Draws a time step k ~ U{1..K} per sample and the noise eps. With
    ``continuous_noise_level`` (SR3) the noise level sqrt(gamma) is drawn
    uniformly between sqrt(abar_k) and sqrt(abar_{k-1}); otherwise it is
    sqrt(abar_k). Returns ``z_in`` (the network input, masked as Eq. 11 when
    configured), ``noise`` (the target), ``mask`` (M(t) or None when YODA is
    off), ``k`` (B,) and ``noise_level`` (B,) sqrt(gamma).
    """
    B = x0.shape[0]
    u = _rand((B, ), x0, generator)
    k = (u * schedule.num_steps).long().clamp_(0, schedule.num_steps - 1) + 1
    hi = schedule.sqrt_alphas_cumprod.to(x0.device)[k - 1]
    lo = schedule.sqrt_alphas_cumprod.to(x0.device)[k]
    if continuous_noise_level:
        noise_level = lo + (hi - lo) * _rand((B, ), x0, generator)
    else:
        noise_level = lo
    noise = _randn_like(x0, generator)
    gamma = noise_level.view(-1, *([1] * (x0.dim() - 1)))
    z_t = gamma.to(x0.dtype) * x0 + (1 - gamma * gamma).sqrt().to(x0.dtype) * noise
    mask = None
    if cfg.enabled:
        if attention is None:
            raise ValueError('YODA is enabled but no attention map was given for this batch')
        mask = _mask_from_budget(_budget(attention, cfg, schedule), schedule.timesteps.to(x0.device)[k], x0.dtype)
        if cfg.mask_network_input:
            z_t = z_t * mask  # Eq. 11, applied in training as in sampling
    return {'z_in': z_t, 'noise': noise, 'mask': mask, 'k': k, 'noise_level': noise_level.to(x0.dtype)}


def _budget(attention: torch.Tensor, cfg: YODAConfig, schedule: DiffusionSchedule) -> torch.Tensor:
    """T * (A + l) of Eq. 9, float64, (B, 1, H, W)."""
    attention = check_attention(attention)
    return schedule.num_train_timesteps * (attention.double() + cfg.lower_bound)


def _mask_from_budget(budget: torch.Tensor, t, dtype) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        t = t.double().view(-1, 1, 1, 1)
    return (budget >= t).to(dtype)


def predict_start_from_noise(schedule: DiffusionSchedule, z_t: torch.Tensor, k: torch.Tensor,
                             eps: torch.Tensor) -> torch.Tensor:
    """Invert Eq. 3: z0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (schedule.gather('sqrt_recip_alphas_cumprod', k, z_t) * z_t -
            schedule.gather('sqrt_recipm1_alphas_cumprod', k, z_t) * eps)


def q_posterior(schedule: DiffusionSchedule, z0: torch.Tensor, z_t: torch.Tensor,
                k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of q(z_{k-1} | z_k, z0).

    With z0 from :func:`predict_start_from_noise` (unclipped) the mean equals
    the paper's Eq. 6.
    """
    mean = (schedule.gather('posterior_mean_coef1', k, z_t) * z0 +
            schedule.gather('posterior_mean_coef2', k, z_t) * z_t)
    return mean, schedule.gather('posterior_log_variance_clipped', k, z_t)


def masked_reverse_step(schedule: DiffusionSchedule,
                        z_t: torch.Tensor,
                        k: torch.Tensor,
                        eps: torch.Tensor,
                        noise: torch.Tensor,
                        mask: Optional[torch.Tensor] = None,
                        lr_mean: Optional[torch.Tensor] = None,
                        lr_noise: str = 'marginal',
                        clip_range: Optional[Tuple[float, float]] = (-1.0, 1.0),
                        variance: str = 'posterior') -> torch.Tensor:
    """One reverse step z_k -> z_{k-1}, Eq. 12-14 (Eq. 7 when ``mask`` is None).

    ``k`` is a long tensor (B,) of steps on ``schedule``'s grid, ``eps`` the
    network's noise prediction for the (masked, Eq. 11) input, ``noise`` a
    standard Gaussian draw shaped like ``z_t``.
    """
    if variance not in VARIANCE_TYPES:
        raise ValueError(f'variance must be one of {VARIANCE_TYPES}, got {variance!r}')
    z0 = predict_start_from_noise(schedule, z_t, k, eps)
    if clip_range is not None:
        z0 = z0.clamp(*clip_range)
    mean, log_var = q_posterior(schedule, z0, z_t, k)
    if variance == 'posterior':
        sigma = (0.5 * log_var).exp()
    else:
        sigma = schedule.gather('betas', k, z_t).sqrt()
    not_last = (k > 1).to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    z_sr = mean + not_last * sigma * noise  # Eq. 12
    if mask is None:
        return z_sr
    if lr_mean is None:
        raise ValueError('a masked reverse step needs lr_mean (x for SR3, zeros for residual models)')
    if lr_noise == 'marginal':
        z_lr = schedule.q_sample(lr_mean, k - 1, noise)  # q(z_{k-1} | x)
    elif lr_noise == 'posterior':
        z_lr = lr_mean + not_last * sigma * noise  # Eq. 13 literally: N(x, Sigma_theta)
    else:
        raise ValueError(f'lr_noise must be one of {LR_NOISE_MODES}, got {lr_noise!r}')
    return torch.where(mask.bool(), z_sr, z_lr)  # Eq. 14


def initial_state(schedule: DiffusionSchedule, noise: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  lr_mean: Optional[torch.Tensor] = None, lr_noise: str = 'marginal') -> torch.Tensor:
    """z_K: pure noise where M(T) = 1 (everywhere for vanilla), noisy LR elsewhere."""
    if mask is None:
        return noise
    K = torch.full((noise.shape[0], ), schedule.num_steps, dtype=torch.long, device=noise.device)
    if lr_noise == 'marginal':
        z_lr = schedule.q_sample(lr_mean, K, noise)
    else:
        sigma = (0.5 * schedule.gather('posterior_log_variance_clipped', K, noise)).exp()
        z_lr = lr_mean + sigma * noise
    return torch.where(mask.bool(), noise, z_lr)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_loop(denoise_fn: DenoiseFn,
                schedule: DiffusionSchedule,
                lr_mean: torch.Tensor,
                attention: Optional[torch.Tensor] = None,
                cfg: Optional[YODAConfig] = None,
                generator: Optional[torch.Generator] = None,
                clip_range: Optional[Tuple[float, float]] = (-1.0, 1.0),
                variance: str = 'posterior',
                progress: bool = False,
                callback: Optional[Callable[[int, torch.Tensor, Optional[torch.Tensor]], None]] = None,
                pass_mask: bool = False) -> torch.Tensor:
    """Run the reverse process from k = K to 0 on ``schedule``'s grid.

    ``denoise_fn(z_in, k)`` returns the predicted noise for the network input
    ``z_in`` at steps ``k`` (B,); with ``pass_mask`` it is called as
    ``denoise_fn(z_in, k, mask_k)`` (see :class:`.sparse.SparseDenoiser`). With
    YODA, a step whose mask is empty calls no network: Eq. 14 keeps only the
    noisy-LR component there, whatever the prediction. ``lr_mean`` fixes the output shape and is the
    mean of the unrefined component (x for SR3, zeros for SRDiff). With YODA
    (``cfg.enabled`` and ``attention`` given) the mask of step k is Eq. 9 at
    the training time step ``schedule.timesteps[k]``. ``callback(k, z_{k-1},
    mask_k)`` sees every step (for figures of intermediate states).
    """
    yoda = cfg is not None and cfg.enabled
    if yoda and attention is None:
        raise ValueError('YODA sampling needs an attention map')
    budget = _budget(attention, cfg, schedule) if yoda else None
    lr_noise = cfg.lr_noise if yoda else 'marginal'
    B = lr_mean.shape[0]
    timesteps = schedule.timesteps.tolist()
    mask = _mask_from_budget(budget, timesteps[-1], lr_mean.dtype) if yoda else None
    z = initial_state(schedule, _randn_like(lr_mean, generator), mask, lr_mean, lr_noise)
    steps = range(schedule.num_steps, 0, -1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc='sampling', unit='step', leave=False)
    for k in steps:
        kt = torch.full((B, ), k, dtype=torch.long, device=lr_mean.device)
        if yoda:
            mask = _mask_from_budget(budget, timesteps[k], lr_mean.dtype)
            z_in = z * mask if cfg.mask_network_input else z  # Eq. 11
        else:
            z_in = z
        if yoda and not bool(mask.any()):
            eps = torch.zeros_like(z)  # nothing to refine at this step
        elif pass_mask:
            eps = denoise_fn(z_in, kt, mask)
        else:
            eps = denoise_fn(z_in, kt)
        noise = _randn_like(z, generator)
        z = masked_reverse_step(schedule, z, kt, eps, noise, mask, lr_mean, lr_noise, clip_range, variance)
        if callback is not None:
            callback(k, z, mask)
    return z
