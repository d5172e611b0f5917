"""Schedules, respacing, posterior math (float64 reference), training inputs and the yoda option section.

The samplers and the YODA blend (Eq. 11-14) are tested in tests/test_samplers.py.
"""
import numpy as np
import pytest
import torch

from conftest import mentions
from yoda_plugin.core import (DiffusionSchedule, YODAConfig, YODAMask, make_beta_schedule, masked_noise_loss,
                              predict_start_from_noise, q_posterior, space_timesteps, time_dependent_mask,
                              training_inputs)


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


def test_training_inputs_yoda_full_attention_equals_vanilla():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05))
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    van = training_inputs(schedule, x0, YODAConfig(enabled=False).mask(None, 100), True, torch.Generator().manual_seed(5))
    yod = training_inputs(schedule, x0, YODAMask(torch.ones(3, 1, 8, 8), 0.1, 100), True,
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
    out = training_inputs(schedule, x0, cfg.mask(att, 100), True, torch.Generator().manual_seed(0))
    k = out['k']
    assert int(k.min()) >= 1 and int(k.max()) <= 100
    lo, hi = schedule.sqrt_alphas_cumprod[k].float(), schedule.sqrt_alphas_cumprod[k - 1].float()
    assert bool(((out['noise_level'] >= lo - 1e-6) & (out['noise_level'] <= hi + 1e-6)).all())
    assert torch.equal(out['mask'], time_dependent_mask(att, 0.2, k, 100))
    assert bool((out['z_in'][out['mask'].expand_as(x0) == 0] == 0).all())  # Eq. 11 in training too
    unmasked = training_inputs(schedule, x0, cfg.mask(att, 100), False, torch.Generator().manual_seed(0))
    assert torch.equal(unmasked['mask'], out['mask'])
    assert not bool((unmasked['z_in'][out['mask'].expand_as(x0) == 0] == 0).all())
    discrete = training_inputs(schedule, x0, cfg.mask(att, 100), True, torch.Generator().manual_seed(0),
                               continuous_noise_level=False)
    assert torch.allclose(discrete['noise_level'], schedule.sqrt_alphas_cumprod[discrete['k']].float())
    with pytest.raises(ValueError, match='attention'):
        cfg.mask(None, 100)


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
    with pytest.raises(ValueError, match=mentions('lower_bund', 'yoda.lower_bound?')):
        YODAConfig.from_options({'lower_bund': 0.3})
    with pytest.raises(ValueError, match='section is empty'):
        YODAConfig.from_options({})
    assert YODAConfig.from_options({'enabled': False}).mask(torch.rand(1, 1, 4, 4), 100) is None




def test_eps_prediction_targets_the_noise_and_passes_outputs_through():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05))
    assert schedule.prediction == 'eps' and schedule.respace(10).prediction == 'eps'
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = training_inputs(schedule, x0, None, True, torch.Generator().manual_seed(2))
    assert out['target'] is out['noise']
    pred = torch.randn_like(x0)
    assert schedule.noise_from_output(pred, out['z_in'], out['noise_level']) is pred


def test_v_prediction_hand_checked_and_inverted():
    """v = g eps - sqrt(1 - g^2) x0 (Salimans & Ho 2022) at g = 0.6 (sqrt(1 - g^2) = 0.8), and eps back from v."""
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05), prediction='v')
    x0, eps, g = torch.tensor([[[[0.5]]]]), torch.tensor([[[[1.0]]]]), torch.tensor([0.6])
    v = schedule.training_target(g, x0, eps)
    assert torch.allclose(v, torch.tensor(0.6 * 1.0 - 0.8 * 0.5))  # 0.2
    z_t = 0.6 * x0 + 0.8 * eps  # Eq. 3
    assert torch.allclose(schedule.noise_from_output(v, z_t, g), eps)
    # The x0 the samplers then recover (Eq. 3 inverted) is g z - sqrt(1 - g^2) v, without 1/g amplification.
    assert torch.allclose((z_t - 0.8 * eps) / 0.6, 0.6 * z_t - 0.8 * v)


def test_v_prediction_training_inputs_and_respacing():
    schedule = DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05), prediction='v')
    assert schedule.respace(10).prediction == 'v'
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    out = training_inputs(schedule, x0, None, True, torch.Generator().manual_seed(3))
    eps = torch.Generator().manual_seed(3)
    ref = training_inputs(DiffusionSchedule(make_beta_schedule('linear', 100, 1e-4, 0.05)), x0, None, True, eps)
    for key in ('z_in', 'noise', 'k', 'noise_level'):  # the same draw; only the target differs
        assert torch.equal(out[key], ref[key]), key
    back = schedule.noise_from_output(out['target'], out['z_in'], out['noise_level'])
    assert torch.allclose(back, out['noise'], atol=1e-5)
    with pytest.raises(ValueError, match=mentions('diffusion.prediction', "'x0'")):
        DiffusionSchedule(make_beta_schedule('linear', 10), prediction='x0')
