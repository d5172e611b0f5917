"""Eq. 9 (time-dependent mask) and Eq. 10 (masked loss) on hand-checked cases and properties."""
import math

import pytest
import torch

from conftest import assert_mentions
from yoda_plugin.core import (YODAMask, diffused_steps_per_pixel, masked_noise_loss, pixel_update_ratio,
                              space_timesteps, time_dependent_mask)

A_HAND = torch.tensor([[0.0, 0.5], [0.8, 1.0]])


def test_mask_hand_computed():
    # T = 10, l = 0.2: budgets T * (A + l) = [[2, 7], [10, 12]].
    T, l = 10, 0.2
    expected = {
        1: [[1, 1], [1, 1]],
        2: [[1, 1], [1, 1]],
        3: [[0, 1], [1, 1]],
        7: [[0, 1], [1, 1]],
        8: [[0, 0], [1, 1]],
        10: [[0, 0], [1, 1]],
    }
    for t, m in expected.items():
        got = time_dependent_mask(A_HAND, l, t, T)
        assert got.shape == (1, 1, 2, 2)
        assert got[0, 0].tolist() == [[float(v) for v in row] for row in m], f't={t}'


def test_mask_per_sample_time_steps():
    T, l = 10, 0.2
    att = A_HAND.expand(3, 2, 2)
    t = torch.tensor([1, 3, 8])
    got = time_dependent_mask(att, l, t, T)
    for i, ti in enumerate(t.tolist()):
        assert torch.equal(got[i], time_dependent_mask(A_HAND, l, ti, T)[0])


def test_mask_is_monotone_in_time():
    torch.manual_seed(0)
    att = torch.rand(4, 1, 16, 16)
    T, l = 50, 0.15
    previous = torch.zeros_like(att)
    for t in range(T, 0, -1):  # sampling order: once refined, refined until the end
        m = time_dependent_mask(att, l, t, T)
        assert bool((m >= previous).all()), f'pixel switched off at t={t}'
        previous = m
    assert bool((previous == 1).all()), 'every pixel must be refined at the last step'


@pytest.mark.parametrize('T,l', [(500, 0.4), (100, 0.05), (37, 0.5)])
def test_steps_per_pixel(T, l):
    torch.manual_seed(1)
    att = torch.rand(2, 1, 8, 8)
    counts = torch.zeros_like(att)
    for t in range(1, T + 1):
        counts += time_dependent_mask(att, l, t, T)
    expected = torch.clamp(torch.floor(T * (att.double() + l)), max=T)
    assert torch.equal(counts.double(), expected)
    assert bool((counts >= math.floor(T * l)).all())
    steps = diffused_steps_per_pixel(att, l, torch.arange(T + 1), T)
    assert torch.equal(steps.double(), counts.double())


def test_steps_on_respaced_grid_follow_normalised_time():
    # T_train = 500, T_eval = 200: pixel (i, j) gets ~ T_eval * (A + l) of the 200 steps.
    torch.manual_seed(2)
    att = torch.rand(1, 1, 32, 32)
    l = 0.3
    ts = space_timesteps(500, 200)
    steps = diffused_steps_per_pixel(att, l, ts, 500).double()
    expected = torch.clamp(200 * (att.double() + l), max=200)
    # floor() costs < 1 step, rounding the grid to whole training steps < 0.2 more.
    assert float((steps - expected).abs().max()) < 1.2 + 1e-9
    assert bool((steps >= math.floor(200 * l) - 1).all())


def test_update_ratio_full_attention_is_one():
    ts = space_timesteps(500, 200)
    assert pixel_update_ratio(torch.ones(2, 1, 4, 4), 0.1, ts, 500).tolist() == [1.0, 1.0]
    r = pixel_update_ratio(torch.zeros(1, 1, 4, 4), 0.25, torch.arange(101), 100)
    assert r.item() == pytest.approx(0.25)


@pytest.mark.parametrize('bad,words', [
    (torch.tensor([[0.5, 1.5]]), ('[0, 1]', 'max 1.5')),
    (torch.tensor([[0.5, -0.1]]), ('[0, 1]', 'min -0.1')),
    (torch.tensor([[0.5, float('nan')]]), 'NaN'),
    (torch.tensor([[0.5, float('inf')]]), 'NaN or Inf'),
    (torch.tensor([[1, 0]]), 'floating point'),
    (torch.zeros(2, 3, 4, 4), 'must have shape'),
    (torch.zeros(0, 4), 'empty'),
])
def test_attention_validation(bad, words):
    with pytest.raises((ValueError, TypeError), match=None) as err:
        time_dependent_mask(bad, 0.2, 1, 10)
    assert_mentions(str(err.value), *((words,) if isinstance(words, str) else words))


@pytest.mark.parametrize('l', [0, 1, 1.5, -0.1, 'a', True, None])
def test_lower_bound_validation(l):
    with pytest.raises(ValueError, match='lower_bound'):
        time_dependent_mask(A_HAND, l, 1, 10)


def test_masked_loss_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 8.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    # |diff| = [1, 2, 3, 4]; masked = [1, 0, 3, 4]
    assert masked_noise_loss(pred, target, None).item() == pytest.approx(10 / 4)
    assert masked_noise_loss(pred, target, mask).item() == pytest.approx(8 / 4)
    assert masked_noise_loss(pred, target, mask, normalization='masked').item() == pytest.approx(8 / 3)
    assert masked_noise_loss(pred, target, mask, loss_type='l2').item() == pytest.approx((1 + 9 + 16) / 4)


def test_masked_loss_with_full_mask_equals_vanilla_l1():
    torch.manual_seed(3)
    pred, target = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    ones = torch.ones(2, 1, 5, 5)
    vanilla = torch.nn.functional.l1_loss(pred, target)
    assert torch.equal(masked_noise_loss(pred, target, ones), vanilla)
    assert torch.allclose(masked_noise_loss(pred, target, ones, normalization='masked'), vanilla)


def test_masked_loss_gradient_only_in_mask():
    pred = torch.randn(1, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    masked_noise_loss(pred, torch.zeros_like(pred), mask).backward()
    assert bool((pred.grad[..., 2:, :] == 0).all())
    assert bool((pred.grad[..., :2, :] != 0).all())


def test_masked_loss_errors():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match='loss_type'):
        masked_noise_loss(x, x, loss_type='huber')
    with pytest.raises(ValueError, match='normalization'):
        masked_noise_loss(x, x, torch.ones(1, 1, 4, 4), normalization='sum')
    with pytest.raises(ValueError, match='shape'):
        masked_noise_loss(x, torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match='mask shape'):
        masked_noise_loss(x, x, torch.ones(1, 1, 2, 2))


def test_ten_step_grid_by_hand():
    """T = 500, K = 10, l = 0.4: the grid is t = 50, 100, ..., 500, the budget 500 (A + 0.4).

    A = 0 -> budget 200 -> refined at t = 50..200: 4 steps; A = 0.5 -> 450: 9 steps; A = 1 -> all 10;
    A = 0.21 -> 305: 6 steps. Every pixel gets at least one step (the last one, t = 50 <= 200).
    """
    ts = space_timesteps(500, 10)
    assert ts.tolist() == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500]
    att = torch.tensor([[0.0, 0.5], [1.0, 0.21]])
    mask = YODAMask(att, 0.4, 500)
    assert mask.steps_per_pixel(ts).flatten().tolist() == [4, 9, 10, 6]
    assert float(mask.update_ratio(ts)) == pytest.approx((4 + 9 + 10 + 6) / 40)
    assert mask.at(50).flatten().tolist() == [1, 1, 1, 1]  # the last step refines every pixel
    assert mask.at(250).flatten().tolist() == [0, 1, 1, 1]
    assert mask.at(500).flatten().tolist() == [0, 0, 1, 0]
    # The same rule in normalised time on the 500-step training grid: shares agree.
    full = mask.update_ratio(torch.arange(501))
    assert abs(float(full) - float(mask.update_ratio(ts))) < 0.02


def test_yoda_mask_crop_and_per_sample_steps():
    att = torch.rand(3, 1, 6, 6)
    mask = YODAMask(att, 0.3, 100)
    t = torch.tensor([10, 50, 100])
    assert torch.equal(mask.crop((1, 4, 2, 6)).at(t), mask.at(t)[..., 1:4, 2:6])
    assert torch.equal(mask.at(t), time_dependent_mask(att, 0.3, t, 100))
    with pytest.raises(ValueError, match='num_train_timesteps'):
        YODAMask(att, 0.3, 0)
