"""Schedules, respacing, posterior math (float64 reference) and the masked sampler (Eq. 11-14)."""
import numpy as np
import pytest
import torch

from yoda_plugin.core import (DiffusionSchedule, YODAConfig, make_beta_schedule, masked_noise_loss,
                              masked_reverse_step, predict_start_from_noise, q_posterior, sample_loop,
                              space_timesteps, time_dependent_mask, training_inputs)


def reference_alphas_cumprod(betas):
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def test_linear_schedule_and_cumprod():
    betas = make_beta_schedule('linear', 500, 4e-6, 4e-2)
    assert betas.dtype == torch.float64 and betas.shape == (500, )
    s = DiffusionSchedule(betas)
    ref = reference_alphas_cumprod(betas.numpy())
    assert np.allclose(s.alphas_cumprod[1:].numpy(), ref, rtol=0, atol=1e-15)
    assert s.alphas_cumprod[0].item() == 1.0
    # SR3's 2000-step schedule compressed to 500 steps ends at pure noise.
    assert s.alphas_cumprod[-1].item() < 1e-4


@pytest.mark.parametrize('name', ['linear', 'cosine', 'quad'])
def test_schedules_valid(name):
    b = make_beta_schedule(name, 100)
    assert bool(((b > 0) & (b < 1)).all())


def test_schedule_errors():
    with pytest.raises(ValueError, match='schedule'):
        make_beta_schedule('sigmoid', 10)
    with pytest.raises(ValueError, match='num_timesteps'):
        make_beta_schedule('linear', 0)
    with pytest.raises(ValueError, match='betas outside'):
        make_beta_schedule('linear', 10, 0.5, 1.5)


def test_space_timesteps():
    ts = space_timesteps(500, 200)
    assert ts[0] == 0 and ts[-1] == 500 and len(ts) == 201
    assert bool((ts[1:] > ts[:-1]).all())
    assert torch.equal(space_timesteps(10, 10), torch.arange(11))
    with pytest.raises(ValueError, match='sampling steps'):
        space_timesteps(100, 200)


def test_respacing_keeps_alphas_cumprod():
    s = DiffusionSchedule.from_options('linear', 500, linear_start=4e-6, linear_end=4e-2)
    r = s.respace(200)
    assert r.num_steps == 200 and r.num_train_timesteps == 500
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-12, atol=0)
    assert s.respace(500) is s
    with pytest.raises(ValueError):
        r.respace(100)


def test_posterior_against_float64_gaussian_product():
    # Independent derivation: prior z_{t-1} ~ N(sqrt(abar_{t-1}) z0, 1 - abar_{t-1}),
    # likelihood z_t | z_{t-1} ~ N(sqrt(alpha_t) z_{t-1}, beta_t); multiply the Gaussians.
    s = DiffusionSchedule(make_beta_schedule('linear', 50, 1e-4, 0.05))
    rng = np.random.default_rng(0)
    z0, zt = rng.normal(size=(3, 1, 2, 2)), rng.normal(size=(3, 1, 2, 2))
    k = torch.tensor([2, 17, 50])
    mean, log_var = q_posterior(s, torch.from_numpy(z0), torch.from_numpy(zt), k)
    for i, t in enumerate(k.tolist()):
        beta = s.betas[t].item()
        alpha = 1 - beta
        abar_prev = s.alphas_cumprod[t - 1].item()
        prec = 1 / (1 - abar_prev) + alpha / beta
        var = 1 / prec
        ref_mean = var * (np.sqrt(abar_prev) * z0[i] / (1 - abar_prev) + np.sqrt(alpha) * zt[i] / beta)
        assert np.allclose(mean[i].numpy(), ref_mean, rtol=1e-10, atol=1e-12)
        assert np.isclose(np.exp(log_var[i].item()), var, rtol=1e-10)


def test_posterior_mean_equals_paper_eq6():
    # With the unclipped z0 prediction the posterior mean is Eq. 6:
    # 1/sqrt(alpha_t) (z_t - beta_t / sqrt(1 - abar_t) eps).
    s = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.02))
    torch.manual_seed(0)
    zt, eps = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    k = torch.tensor([2, 10, 50, 100])
    z0 = predict_start_from_noise(s, zt, k, eps)
    mean, _ = q_posterior(s, z0, zt, k)
    a = s.gather('alphas', k, zt)
    b = s.gather('betas', k, zt)
    abar = s.gather('alphas_cumprod', k, zt)
    eq6 = (zt - b / (1 - abar).sqrt() * eps) / a.sqrt()
    assert torch.allclose(mean, eq6, rtol=1e-10, atol=1e-12)


def toy_denoiser(cond):
    """A fixed, input-dependent noise predictor (a small random conv net)."""
    torch.manual_seed(42)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1))
    calls = []

    def fn(z_in, k):
        calls.append((z_in.clone(), k.clone()))
        return net(torch.cat([cond, z_in], 1)) + 0.01 * k.view(-1, 1, 1, 1).float()

    return fn, calls


@pytest.fixture
def setup():
    torch.manual_seed(0)
    schedule = DiffusionSchedule(make_beta_schedule('linear', 60, 1e-4, 0.1)).respace(20)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    return schedule, x


@torch.no_grad()
def test_sampling_with_full_attention_equals_vanilla(setup):
    schedule, x = setup
    fn, _ = toy_denoiser(x)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    vanilla = sample_loop(fn, schedule, x, None, None, g1)
    yoda = sample_loop(fn, schedule, x, torch.ones(2, 1, 8, 8), YODAConfig(lower_bound=0.3), g2)
    assert torch.equal(vanilla, yoda)
    g3 = torch.Generator().manual_seed(7)
    off = sample_loop(fn, schedule, x, torch.rand(2, 1, 8, 8), YODAConfig(enabled=False), g3)
    assert torch.equal(vanilla, off)


@torch.no_grad()
def test_masked_sampling_feeds_masked_input_and_keeps_noisy_lr(setup):
    schedule, x = setup
    fn, calls = toy_denoiser(x)
    att = torch.zeros(2, 1, 8, 8)
    att[:, :, :4] = 1.0  # top half refined from the start, bottom half only for T * l
    cfg = YODAConfig(lower_bound=0.25)
    states = []
    sample_loop(fn, schedule, x, att, cfg, torch.Generator().manual_seed(1),
                callback=lambda k, z, m: states.append((k, z.clone(), m.clone())))
    assert len(calls) == schedule.num_steps  # one network call per step
    for (z_in, k), (_, _, mask) in zip(calls, states):
        assert bool((z_in[mask.expand_as(z_in) == 0] == 0).all()), 'Eq. 11: network sees M(t) * z_t'
    # Bottom half is masked out while t > T * l = 15: it holds q(z_{k-1} | x) noisy LR.
    first_k, first_z, first_mask = states[0]
    assert bool((first_mask[:, :, 4:] == 0).all()) and bool((first_mask[:, :, :4] == 1).all())
    final = states[-1]
    assert final[0] == 1 and bool((final[2] == 1).all()), 'every pixel is refined at the last step'


@torch.no_grad()
def test_masked_reverse_step_components(setup):
    schedule, x = setup
    torch.manual_seed(3)
    z, eps, noise = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    k = torch.full((2, ), 10)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., ::2] = 1
    vanilla = masked_reverse_step(schedule, z, k, eps, noise)
    marginal = masked_reverse_step(schedule, z, k, eps, noise, mask, x, 'marginal')
    literal = masked_reverse_step(schedule, z, k, eps, noise, mask, x, 'posterior')
    m = mask.expand_as(z).bool()
    # Eq. 12 inside the mask, identical for both LR modes.
    assert torch.equal(marginal[m], vanilla[m]) and torch.equal(literal[m], vanilla[m])
    # Eq. 13 outside: marginal q(z_{k-1} | x), or literally N(x, Sigma_theta).
    abar_prev = schedule.alphas_cumprod[9].item()
    expect_marginal = abar_prev**0.5 * x + (1 - abar_prev)**0.5 * noise
    assert torch.allclose(marginal[~m], expect_marginal[~m], atol=1e-6)
    sigma = (0.5 * schedule.posterior_log_variance_clipped[10]).exp().item()
    assert torch.allclose(literal[~m], (x + sigma * noise)[~m], atol=1e-6)
    # The residual-space variant (SRDiff) has an LR mean of 0.
    residual = masked_reverse_step(schedule, z, k, eps, noise, mask, torch.zeros_like(x), 'marginal')
    assert torch.allclose(residual[~m], ((1 - abar_prev)**0.5 * noise)[~m], atol=1e-6)


def test_last_step_adds_no_noise(setup):
    schedule, x = setup
    z, eps = torch.randn_like(x), torch.randn_like(x)
    one = torch.ones(2, dtype=torch.long)
    a = masked_reverse_step(schedule, z, one, eps, torch.randn_like(x))
    b = masked_reverse_step(schedule, z, one, eps, torch.randn_like(x))
    assert torch.equal(a, b)


def test_variance_options(setup):
    schedule, x = setup
    z, eps, noise = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    k = torch.full((2, ), 5)
    post = masked_reverse_step(schedule, z, k, eps, noise, clip_range=None)
    beta = masked_reverse_step(schedule, z, k, eps, noise, clip_range=None, variance='beta')
    mean = masked_reverse_step(schedule, z, k, eps, torch.zeros_like(x), clip_range=None)
    assert torch.allclose((beta - mean) / noise, schedule.betas[5].sqrt().float() * torch.ones_like(x), atol=1e-4)
    assert torch.allclose((post - mean) / noise,
                          (0.5 * schedule.posterior_log_variance_clipped[5]).exp().float() * torch.ones_like(x),
                          atol=1e-4)
    with pytest.raises(ValueError, match='variance'):
        masked_reverse_step(schedule, z, k, eps, noise, variance='learned')


def test_training_inputs_yoda_full_attention_equals_vanilla():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05))
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    van = training_inputs(schedule, x0, None, YODAConfig(enabled=False), torch.Generator().manual_seed(5))
    yod = training_inputs(schedule, x0, torch.ones(3, 1, 8, 8), YODAConfig(lower_bound=0.1),
                          torch.Generator().manual_seed(5))
    assert van['mask'] is None
    for key in ('z_in', 'noise', 'k', 'noise_level'):
        assert torch.equal(van[key], yod[key]), key
    pred = torch.randn_like(x0)
    assert torch.equal(masked_noise_loss(pred, van['noise'], None), masked_noise_loss(pred, yod['noise'], yod['mask']))


def test_training_inputs_mask_and_noise_level():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05))
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    att = torch.rand(64, 1, 4, 4)
    cfg = YODAConfig(lower_bound=0.2)
    out = training_inputs(schedule, x0, att, cfg, torch.Generator().manual_seed(0))
    k = out['k']
    assert int(k.min()) >= 1 and int(k.max()) <= 100
    lo, hi = schedule.sqrt_alphas_cumprod[k].float(), schedule.sqrt_alphas_cumprod[k - 1].float()
    assert bool(((out['noise_level'] >= lo - 1e-6) & (out['noise_level'] <= hi + 1e-6)).all())
    assert torch.equal(out['mask'], time_dependent_mask(att, 0.2, k, 100))
    assert bool((out['z_in'][out['mask'].expand_as(x0) == 0] == 0).all())  # Eq. 11 in training too
    unmasked = training_inputs(schedule, x0, att, YODAConfig(lower_bound=0.2, mask_network_input=False),
                               torch.Generator().manual_seed(0))
    assert torch.equal(unmasked['mask'], out['mask'])
    assert not bool((unmasked['z_in'][out['mask'].expand_as(x0) == 0] == 0).all())
    discrete = training_inputs(schedule, x0, att, cfg, torch.Generator().manual_seed(0), continuous_noise_level=False)
    assert torch.allclose(discrete['noise_level'], schedule.sqrt_alphas_cumprod[discrete['k']].float())
    with pytest.raises(ValueError, match='attention'):
        training_inputs(schedule, x0, None, cfg)


def test_yoda_config_from_options():
    assert YODAConfig.from_options(None).enabled is False
    cfg = YODAConfig.from_options({'enabled': True, 'lower_bound': 0.3, 'lr_noise': 'posterior'})
    assert cfg.lower_bound == 0.3 and cfg.lr_noise == 'posterior'
    with pytest.raises(ValueError, match='yoda.lowerbound'):
        YODAConfig.from_options({'lowerbound': 0.3})
    with pytest.raises(ValueError, match='lr_noise'):
        YODAConfig.from_options({'lr_noise': 'beta'})
    with pytest.raises(ValueError, match='lower_bound'):
        YODAConfig.from_options({'lower_bound': 1.0})


@pytest.mark.parametrize('lr_noise', ['marginal', 'posterior'])
@pytest.mark.parametrize('yoda', [False, True])
@torch.no_grad()
def test_oracle_denoiser_recovers_the_target(lr_noise, yoda):
    """With the exact noise (oracle) the reverse process must land on y, masks and respacing included."""
    torch.manual_seed(0)
    schedule = DiffusionSchedule(make_beta_schedule('linear', 200, 1e-4, 0.05)).respace(40)
    y = torch.rand(2, 3, 8, 8) * 1.6 - 0.8  # the HR target
    x = (y + 0.3 * torch.randn_like(y)).clamp(-1, 1)  # a different "upsampled LR"

    def oracle(z_in, k):
        abar = schedule.gather('alphas_cumprod', k, z_in)
        return (z_in - abar.sqrt() * y) / (1 - abar).sqrt()

    att = torch.rand(2, 1, 8, 8)
    out = sample_loop(oracle, schedule, x, att if yoda else None, YODAConfig(enabled=yoda, lr_noise=lr_noise),
                      torch.Generator().manual_seed(3))
    assert torch.allclose(out, y, atol=1e-5)
