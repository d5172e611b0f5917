"""Sampler objects and the YODA blend around them (paper Eq. 9, 11-14).

The DDPM sampler reproduces the pre-refactor loop (tests/reference_ddpm.py) bit for bit; every sampler
with A = 1 equals itself without YODA bit for bit; unrefined pixels follow the documented LR path; an
oracle denoiser recovers the target for every sampler; DDIM with eta = 1 has DDPM's per-step mean and
variance; DPM-Solver++(2M) reduces to DDIM where its second-order term vanishes.
"""
import math

import pytest
import torch

from conftest import mentions
from reference_ddpm import reference_sample_loop
from yoda_plugin.core import (SAMPLERS, DDIMSampler, DDPMSampler, DiffusionSchedule, DPMSolverSampler, SamplerConfig,
                              YODAConfig, YODAMask, YODASampler, make_beta_schedule, predict_noise_from_start, sample)

SAMPLER_CASES = [('ddpm', {}), ('ddim', {'eta': 0.0}), ('ddim', {'eta': 0.5}), ('dpmpp_2m', {})]


def toy_net(cond):
    """A fixed, input-dependent noise predictor (a small random conv net) that records its calls."""
    torch.manual_seed(42)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1))
    calls = []

    def fn(z_in, k, mask=None):
        calls.append((z_in.clone(), k.clone()))
        return net(torch.cat([cond, z_in], 1)) + 0.01 * k.view(-1, 1, 1, 1).float()

    return fn, calls


@pytest.fixture
def train_schedule():
    return DiffusionSchedule(make_beta_schedule('linear', 60, 1e-4, 0.1))


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(2, 3, 8, 8) * 2 - 1


def build(train_schedule, name, steps=20, **kw):
    return SamplerConfig(type=name, steps=steps, **kw).build(train_schedule)


# -- DDPM equals the frozen reference --------------------------------------------------------------------

@pytest.mark.parametrize('case', [
    dict(yoda=False), dict(yoda=True, lr_noise='marginal'), dict(yoda=True, lr_noise='posterior'),
    dict(yoda=True, lr_noise='marginal', variance='beta'), dict(yoda=True, lr_noise='marginal', mask_input=False),
    dict(yoda=True, lr_noise='marginal', clip=False)])
@torch.no_grad()
def test_ddpm_equals_the_reference_loop_bit_for_bit(train_schedule, x, case):
    fn, _ = toy_net(x)
    variance, clip = case.get('variance', 'posterior'), (-1.0, 1.0) if case.get('clip', True) else None
    sampler = DDPMSampler(train_schedule, 20, clip, variance)
    att = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) if case['yoda'] else None
    lr_noise, mask_input = case.get('lr_noise', 'marginal'), case.get('mask_input', True)
    ref = reference_sample_loop(lambda z, k: fn(z, k), sampler.schedule, x, att, 0.3, lr_noise, mask_input,
                                torch.Generator().manual_seed(7), clip, variance)
    cfg = YODAConfig(enabled=case['yoda'], lower_bound=0.3, lr_noise=lr_noise, mask_network_input=mask_input)
    new = sample(fn, cfg.wrap(sampler, att, x), x, torch.Generator().manual_seed(7))
    assert torch.equal(new, ref)


@torch.no_grad()
def test_empty_mask_steps_call_no_network(train_schedule, x):
    fn, calls = toy_net(x)
    sampler = DDPMSampler(train_schedule, 20)
    att = torch.zeros(2, 1, 8, 8)  # budget T * l = 15: only steps with t <= 15 refine anything
    sample(fn, YODAConfig(lower_bound=0.25).wrap(sampler, att, x), x, torch.Generator().manual_seed(1))
    refining = int((sampler.schedule.timesteps[1:] <= 15).sum())
    assert len(calls) == refining == 5


# -- YODA off: A = 1 and enabled: false ------------------------------------------------------------------

@pytest.mark.parametrize('name,kw', SAMPLER_CASES)
@torch.no_grad()
def test_full_attention_equals_the_sampler_without_yoda(train_schedule, x, name, kw):
    fn, _ = toy_net(x)
    sampler = build(train_schedule, name, **kw)
    vanilla = sample(fn, sampler, x, torch.Generator().manual_seed(7))
    for lr_noise in ('auto', 'marginal', 'fixed', 'posterior'):
        wrapped = YODAConfig(lower_bound=0.3, lr_noise=lr_noise).wrap(sampler, torch.ones(2, 1, 8, 8), x)
        assert isinstance(wrapped, YODASampler)
        if lr_noise in ('auto', 'fixed') or sampler.stochastic:  # same random stream as the sampler alone
            assert torch.equal(sample(fn, wrapped, x, torch.Generator().manual_seed(7)), vanilla), lr_noise
    off = YODAConfig(enabled=False).wrap(sampler, torch.rand(2, 1, 8, 8), x)
    assert off is sampler  # the one way the core says "vanilla"


# -- the unrefined component (Eq. 13) --------------------------------------------------------------------

def expected_lr(schedule, x, k, eps):
    abar = float(schedule.alphas_cumprod[k])
    return math.sqrt(abar) * x + math.sqrt(1 - abar) * eps


@pytest.mark.parametrize('name,kw,lr_noise', [('ddim', {}, 'auto'), ('dpmpp_2m', {}, 'fixed'),
                                              ('ddpm', {}, 'fixed'), ('ddpm', {}, 'auto')])
@torch.no_grad()
def test_unrefined_pixels_follow_the_documented_lr_path(train_schedule, x, name, kw, lr_noise):
    fn, _ = toy_net(x)
    sampler = build(train_schedule, name, **kw)
    att = torch.zeros(2, 1, 8, 8)
    att[:, :, :4] = 1.0
    wrapped = YODAConfig(lower_bound=0.25, lr_noise=lr_noise).wrap(sampler, att, x)
    states = []
    sample(fn, wrapped, x, torch.Generator().manual_seed(3), callback=lambda k, z, m: states.append((k, z, m)))
    # Replay the generator: z_K's draw, then (stochastic samplers) one draw per step.
    g = torch.Generator().manual_seed(3)
    eps0 = torch.randn(x.shape, generator=g)
    step_noise = {k: torch.randn(x.shape, generator=g) for k in range(sampler.num_steps, 0, -1)} \
        if wrapped.stochastic else {}
    checked = 0
    for k, z, mask in states:
        out = mask.expand_as(z) == 0
        if not bool(out.any()):
            continue
        eps = eps0 if wrapped.lr_noise == 'fixed' else step_noise[k]
        assert torch.allclose(z[out], expected_lr(sampler.schedule, x, k - 1, eps)[out], atol=1e-6, rtol=0)
        checked += 1
    assert checked > 5
    assert wrapped.lr_noise == ('marginal' if name == 'ddpm' and lr_noise == 'auto' else 'fixed')


@torch.no_grad()
def test_posterior_lr_noise_of_a_deterministic_sampler_is_the_clean_lr(train_schedule, x):
    fn, _ = toy_net(x)
    att = torch.zeros(2, 1, 8, 8)
    wrapped = YODAConfig(lower_bound=0.25, lr_noise='posterior').wrap(build(train_schedule, 'ddim'), att, x)
    assert not wrapped.stochastic
    states = []
    sample(fn, wrapped, x, torch.Generator().manual_seed(3), callback=lambda k, z, m: states.append((z, m)))
    z, m = states[0]
    assert bool((m == 0).all()) and torch.equal(z, x)  # N(x, Sigma_theta) with Sigma_theta = 0


@torch.no_grad()
def test_outside_the_mask_the_sampler_predicts_the_lr_image(train_schedule, x):
    """The prediction outside M is replaced by the unrefined noise, so x0_hat = x there (multistep history)."""
    att = torch.zeros(2, 1, 8, 8)
    att[..., ::2] = 1.0
    wrapped = YODAConfig(lower_bound=0.25).wrap(build(train_schedule, 'dpmpp_2m'), att, x * 0.5)
    wrapped.reset()
    z = wrapped.initial_state(torch.randn_like(x))
    k = torch.full((2, ), wrapped.num_steps)
    _, mask = wrapped.network_input(z, k)
    _, x0 = wrapped.step(torch.randn_like(x) * 10, k, z, None)
    out = mask.expand_as(x) == 0
    assert bool(out.any()) and torch.allclose(x0[out], (x * 0.5)[out], atol=1e-5)


# -- oracle: every sampler lands on the target -----------------------------------------------------------

@pytest.mark.parametrize('name,kw', SAMPLER_CASES)
@pytest.mark.parametrize('lr_noise', [None, 'auto', 'marginal', 'fixed', 'posterior'])
@pytest.mark.parametrize('steps', [40, 10])
@torch.no_grad()
def test_oracle_denoiser_recovers_the_target(name, kw, lr_noise, steps):
    torch.manual_seed(0)
    train = DiffusionSchedule(make_beta_schedule('linear', 200, 1e-4, 0.05))
    sampler = build(train, name, steps, **kw)
    y = torch.rand(2, 3, 8, 8) * 1.6 - 0.8  # the HR target
    x = (y + 0.3 * torch.randn_like(y)).clamp(-1, 1)  # a different "upsampled LR"

    def oracle(z_in, k, mask=None):
        return predict_noise_from_start(sampler.schedule, z_in, k, y)

    cfg = YODAConfig(enabled=lr_noise is not None, lr_noise=lr_noise or 'auto')
    out = sample(oracle, cfg.wrap(sampler, torch.rand(2, 1, 8, 8), x), x, torch.Generator().manual_seed(3))
    assert torch.allclose(out, y, atol=1e-5)


# -- per-step equivalences -------------------------------------------------------------------------------

@pytest.mark.parametrize('clip', [None, (-1.0, 1.0)])
def test_ddim_eta_one_has_ddpm_mean_and_variance(train_schedule, clip):
    torch.manual_seed(1)
    ddpm = DDPMSampler(train_schedule, 20, clip)
    ddim = DDIMSampler(train_schedule, 20, clip, eta=1.0)
    z, eps = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    zero = torch.zeros_like(z)
    for step in (2, 7, 13, 20):
        k = torch.full((2, ), step)
        mean_ddpm, x0_ddpm = ddpm.step(eps, k, z, zero)
        mean_ddim, x0_ddim = ddim.step(eps, k, z, zero)
        assert torch.equal(x0_ddpm, x0_ddim)
        assert torch.allclose(mean_ddim, mean_ddpm, rtol=1e-10, atol=1e-12), step
        assert torch.allclose(ddim.noise_std(k, z), ddpm.noise_std(k, z), rtol=1e-10, atol=0), step


def test_ddim_eta_zero_is_deterministic_and_lands_on_x0(train_schedule):
    ddim = DDIMSampler(train_schedule, 20)
    z, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert not ddim.stochastic
    k = torch.ones(1, dtype=torch.long)
    out, x0 = ddim.step(eps, k, z, None)
    assert torch.equal(out, x0)


def test_dpm_solver_first_order_steps_equal_ddim(train_schedule):
    torch.manual_seed(2)
    ddim, dpm = DDIMSampler(train_schedule, 20, None), DPMSolverSampler(train_schedule, 20, None)
    z = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    eps = torch.randn_like(z)
    k = torch.full((2, ), 20)
    first, x0 = dpm.step(eps, k, z, None)  # no history: first order = DDIM (Lu et al. 2022, Sec. 4)
    assert torch.allclose(first, ddim.step(eps, k, z, None)[0], rtol=1e-10, atol=1e-12)
    # A second step whose x0 prediction repeats the last one: the 2M correction vanishes -> DDIM again.
    k19 = torch.full((2, ), 19)
    eps19 = predict_noise_from_start(dpm.schedule, first, k19, x0)
    second, _ = dpm.step(eps19, k19, first, None)
    assert torch.allclose(second, ddim.step(eps19, k19, first, None)[0], rtol=1e-10, atol=1e-12)


def test_dpm_solver_second_order_term_by_hand(train_schedule):
    """2M: D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k+1}, z_{k-1} = sigma'/sigma z - alpha' (e^-h - 1) D."""
    dpm = DPMSolverSampler(train_schedule, 20, None)
    s = dpm.schedule
    z20 = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)
    x0_a, x0_b = 0.3, -0.2
    z19, _ = dpm.step(predict_noise_from_start(s, z20, torch.tensor([20]), torch.full_like(z20, x0_a)),
                      torch.tensor([20]), z20, None)
    z18, _ = dpm.step(predict_noise_from_start(s, z19, torch.tensor([19]), torch.full_like(z20, x0_b)),
                      torch.tensor([19]), z19, None)
    lam = [None] + [0.5 * math.log(float(s.alphas_cumprod[i]) / (1 - float(s.alphas_cumprod[i])))
                     for i in range(1, 21)]
    h, h_last = lam[18] - lam[19], lam[19] - lam[20]
    r = h_last / h
    D = (1 + 1 / (2 * r)) * x0_b - 1 / (2 * r) * x0_a
    sig = [math.sqrt(1 - float(a)) for a in s.alphas_cumprod]
    expect = sig[18] / sig[19] * float(z19) - math.sqrt(float(s.alphas_cumprod[18])) * math.expm1(-h) * D
    assert abs(float(z18) - expect) < 1e-12


@torch.no_grad()
def test_fast_samplers_follow_the_exact_probability_flow_of_a_gaussian():
    """Data N(mu, sd^2): the exact eps is known and the probability-flow ODE has the closed-form solution
    z_t = a_t mu + sqrt(a_t^2 sd^2 + s_t^2) (z_T - a_T mu) / sqrt(a_T^2 sd^2 + s_T^2). Before the final
    jump to x0 (grid step 1), DPM-Solver++(2M) is closer to it than DDIM at the same step count."""
    train = DiffusionSchedule(make_beta_schedule('linear', 500, 1e-4, 0.04))
    mu, sd = 0.3, 0.2

    def exact_eps(sampler):
        def fn(z, k, mask=None):
            abar = sampler.schedule.gather('alphas_cumprod', k, z)
            return (1 - abar).sqrt() * (z - abar.sqrt() * mu) / (abar * sd**2 + (1 - abar))
        return fn

    z_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error_at_step_one(sampler):
        states = {}
        sample(exact_eps(sampler), sampler, z_T, torch.Generator().manual_seed(0),
               callback=lambda k, z, m: states.__setitem__(k - 1, z))
        abar = sampler.schedule.alphas_cumprod
        a1, aT = float(abar[1]), float(abar[-1])
        # sample() draws z_K from the same seed: z_K == z_T.
        exact = math.sqrt(a1) * mu + math.sqrt(a1 * sd**2 + 1 - a1) * (z_T - math.sqrt(aT) * mu) / math.sqrt(
            aT * sd**2 + 1 - aT)
        return float((states[1] - exact).abs().max())

    for steps in (10, 20, 40):  # measured: DDIM 0.053 / 0.064 / 0.054, DPM-Solver++ 0.022 / 0.012 / 0.005
        err_ddim, err_dpm = error_at_step_one(DDIMSampler(train, steps, None)), error_at_step_one(
            DPMSolverSampler(train, steps, None))
        assert err_dpm < err_ddim / 2 and err_dpm < 0.03, (steps, err_dpm, err_ddim)


# -- config ----------------------------------------------------------------------------------------------

def test_sampler_config(train_schedule):
    assert set(SAMPLERS) == {'ddpm', 'ddim', 'dpmpp_2m'}
    s = SamplerConfig.from_options({'type': 'ddim', 'steps': 10, 'eta': 0.5}).build(train_schedule)
    assert isinstance(s, DDIMSampler) and s.num_steps == 10 and s.eta == 0.5 and s.stochastic
    assert SamplerConfig.from_options(None).build(train_schedule, default_steps=12).num_steps == 12
    assert SamplerConfig(type='dpmpp_2m').build(train_schedule).num_steps == 60  # all training steps
    assert int(s.schedule.timesteps[-1]) == 60
    with pytest.raises(ValueError, match='val.sampler.type'):
        SamplerConfig.from_options({'type': 'euler'})
    with pytest.raises(ValueError, match=mentions('val.sampler.step', 'val.sampler.steps?')):
        SamplerConfig.from_options({'step': 10})
    with pytest.raises(ValueError, match=mentions('val.sampler.eta', 'DDIM')):
        SamplerConfig.from_options({'type': 'ddpm', 'eta': 0.5})
    with pytest.raises(ValueError, match=mentions('val.sampler.steps', '[1, ', '100')):
        SamplerConfig(steps=100).build(train_schedule)
    with pytest.raises(ValueError, match=mentions('val.sampler.steps', 'positive integer', 'got 0')):
        SamplerConfig(steps=0)


def test_yoda_sampler_refuses_a_mismatched_mask(train_schedule, x):
    sampler = build(train_schedule, 'ddim')
    with pytest.raises(ValueError, match='training steps'):
        YODASampler(sampler, YODAMask(torch.rand(2, 1, 8, 8), 0.3, 100), x)
    with pytest.raises(ValueError, match=mentions('(2, 1, 4, 4)', 'image')):
        YODASampler(sampler, YODAMask(torch.rand(2, 1, 4, 4), 0.3, 60), x)
