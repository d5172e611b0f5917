"""The DDPM + YODA sampling loop as it was before the sampler objects (frozen reference for the tests).

The new samplers must reproduce it bit for bit for the same generator:
``reference_sample_loop`` is the old ``yoda_plugin.core.sampler.sample_loop``
with its ``masked_reverse_step`` and ``initial_state``, written out with
explicit arguments so that it depends on nothing but the schedule.
"""
import torch


def _randn_like(x, generator):
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def reference_reverse_step(schedule, z_t, k, eps, noise, mask=None, lr_mean=None, lr_noise='marginal',
                           clip_range=(-1.0, 1.0), variance='posterior'):
    z0 = (schedule.gather('sqrt_recip_alphas_cumprod', k, z_t) * z_t -
          schedule.gather('sqrt_recipm1_alphas_cumprod', k, z_t) * eps)
    if clip_range is not None:
        z0 = z0.clamp(*clip_range)
    mean = (schedule.gather('posterior_mean_coef1', k, z_t) * z0 + schedule.gather('posterior_mean_coef2', k, z_t) * z_t)
    log_var = schedule.gather('posterior_log_variance_clipped', k, z_t)
    sigma = (0.5 * log_var).exp() if variance == 'posterior' else schedule.gather('betas', k, z_t).sqrt()
    not_last = (k > 1).to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    z_sr = mean + not_last * sigma * noise
    if mask is None:
        return z_sr
    if lr_noise == 'marginal':
        z_lr = schedule.q_sample(lr_mean, k - 1, noise)
    else:
        z_lr = lr_mean + not_last * sigma * noise
    return torch.where(mask.bool(), z_sr, z_lr)


@torch.no_grad()
def reference_sample_loop(denoise_fn, schedule, lr_mean, attention=None, lower_bound=0.4, lr_noise='marginal',
                          mask_network_input=True, generator=None, clip_range=(-1.0, 1.0), variance='posterior',
                          callback=None):
    """``denoise_fn(z_in, k)``; ``attention`` None is vanilla DDPM."""
    yoda = attention is not None
    budget = schedule.num_train_timesteps * (attention.double() + lower_bound) if yoda else None
    B = lr_mean.shape[0]
    timesteps = schedule.timesteps.tolist()
    noise = _randn_like(lr_mean, generator)
    if yoda:
        mask = (budget >= timesteps[-1]).to(lr_mean.dtype)
        K = torch.full((B, ), schedule.num_steps, dtype=torch.long)
        if lr_noise == 'marginal':
            z_lr = schedule.q_sample(lr_mean, K, noise)
        else:
            z_lr = lr_mean + (0.5 * schedule.gather('posterior_log_variance_clipped', K, noise)).exp() * noise
        z = torch.where(mask.bool(), noise, z_lr)
    else:
        mask, z = None, noise
    for k in range(schedule.num_steps, 0, -1):
        kt = torch.full((B, ), k, dtype=torch.long, device=lr_mean.device)
        if yoda:
            mask = (budget >= timesteps[k]).to(lr_mean.dtype)
            z_in = z * mask if mask_network_input else z
        else:
            z_in = z
        eps = torch.zeros_like(z) if yoda and not bool(mask.any()) else denoise_fn(z_in, kt)
        noise = _randn_like(z, generator)
        z = reference_reverse_step(schedule, z, kt, eps, noise, mask, lr_mean, lr_noise, clip_range, variance)
        if callback is not None:
            callback(k, z, mask)
    return z
