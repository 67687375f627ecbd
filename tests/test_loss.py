"""Closed-form tests of the pure math: flow path, sigma sampling, reward weights, the ORW-CFM-W2 loss."""

import math

import pytest
import torch

from orw_diffusers.flow import (
    euler_step,
    guided_velocity,
    interpolate,
    per_sample_noise,
    sample_sigmas,
    target_velocity,
)
from orw_diffusers.loss import effective_sample_size, orw_cfm_w2_loss, reward_weights


def _batch(seed=0, b=6, shape=(4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *shape), generator=g) for _ in range(3)]


# --- flow ------------------------------------------------------------------------------------------
def test_path_endpoints_and_target_velocity():
    x1, eps, _ = _batch()
    assert torch.equal(interpolate(x1, eps, torch.zeros(6)), x1)
    assert torch.equal(interpolate(x1, eps, torch.ones(6)), eps)
    sigma = torch.full((6,), 0.25)
    x = interpolate(x1, eps, sigma)
    torch.testing.assert_close(x, 0.75 * x1 + 0.25 * eps)
    # u = d x_sigma / d sigma, checked by a finite difference along the path
    h = 1e-3
    fd = (interpolate(x1, eps, sigma + h) - interpolate(x1, eps, sigma - h)) / (2 * h)
    torch.testing.assert_close(fd, target_velocity(x1, eps), atol=1e-3, rtol=1e-3)


def test_euler_integrates_the_straight_path_exactly():
    x1, eps, _ = _batch(1)
    u = target_velocity(x1, eps)
    sigmas = torch.tensor([1.0, 0.7, 0.2, 0.0])
    x = eps
    for i in range(3):
        x = euler_step(x, u, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, x1)


def test_guidance_formula():
    vu, vc, _ = _batch(2)
    torch.testing.assert_close(guided_velocity(vu, vc, 1.0), vc)
    torch.testing.assert_close(guided_velocity(vu, vc, 3.0), vu + 3.0 * (vc - vu))


class _LinearFamily:
    """v = s * x with s from the conditioning: dx/dsigma = k x has the exact solution x(0) = x(1) * exp(-k)."""

    def predict_velocity(self, model, latents, sigmas, cond):
        return cond.tensors["s"].view(-1, *([1] * (latents.ndim - 1))) * latents


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_ode_heun_is_second_order_and_beats_euler_at_equal_model_calls(guidance):
    from orw_diffusers.models.base import Conditioning
    from orw_diffusers.sampling import sample_ode

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    cond, uncond = Conditioning({"s": torch.full((2,), 0.5)}), Conditioning({"s": torch.full((2,), 0.2)})
    k = 0.2 + guidance * (0.5 - 0.2)  # guided velocity = k * x (guidance 1: the conditional 0.5)
    exact = noise * math.exp(-k)

    def error(steps, solver):
        sigmas = torch.linspace(1, 0, steps + 1)
        x = sample_ode(_LinearFamily(), None, noise, cond, uncond, sigmas, guidance, solver=solver)
        return (x - exact).abs().max().item()

    # error ratio when halving the step: ~4 for a second-order method, ~2 for Euler
    assert error(8, "heun") / error(16, "heun") > 3.5
    assert 1.7 < error(8, "euler") / error(16, "euler") < 2.3
    assert error(8, "heun") < error(16, "euler") / 3  # 15 against 16 model calls
    with pytest.raises(ValueError, match="rk4"):
        sample_ode(_LinearFamily(), None, noise, cond, uncond, torch.linspace(1, 0, 3), guidance, solver="rk4")


def test_per_sample_noise_does_not_depend_on_the_batch_split():
    whole = per_sample_noise((2, 3), seed=5, keys=(3, 0), indices=list(range(8)))
    half = per_sample_noise((2, 3), seed=5, keys=(3, 0), indices=[4, 5, 6, 7])
    assert torch.equal(whole[4:], half)
    assert not torch.equal(whole[0], whole[1])
    other_round = per_sample_noise((2, 3), seed=5, keys=(4, 0), indices=[4])
    assert not torch.equal(other_round[0], half[0])


def test_logit_normal_sigmas_match_diffusers_density():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from orw_diffusers.flow import sample_generator

    ours = sample_sigmas("logit_normal", seed=3, keys=(1, 2), indices=[7], logit_mean=0.3, logit_std=1.5)
    theirs = compute_density_for_timestep_sampling(
        "logit_normal", 1, logit_mean=0.3, logit_std=1.5, generator=sample_generator(3, 1, 2, 7)
    )
    torch.testing.assert_close(ours, theirs)
    uniform = sample_sigmas("uniform", seed=3, keys=(1, 2), indices=range(1000))
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="cosmap"):
        sample_sigmas("cosmap", 0, (0,), [0])


# --- weights ---------------------------------------------------------------------------------------
def test_batch_weights_average_one_and_follow_exp():
    r = torch.tensor([0.0, 1.0, 2.0, -1.0])
    w = reward_weights(r, temperature=0.5, normalization="batch")
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    expected = torch.exp(0.5 * r) / torch.exp(0.5 * r).mean()
    torch.testing.assert_close(w, expected)
    assert torch.all(w[1:3].diff() > 0)


def test_extreme_rewards_stay_finite():
    r = torch.tensor([1e4, -1e4, 0.0, 1e4])
    for norm in ("batch", "none", "per_prompt"):
        w = reward_weights(r, temperature=0.5, normalization=norm, group_ids=torch.tensor([0, 0, 1, 1]))
        assert torch.isfinite(w).all(), norm
    w = reward_weights(r, 0.5, "batch")
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.0, 2.0]))


def test_per_prompt_weights_average_one_within_each_group():
    r = torch.tensor([0.0, 10.0, 1.0, 1.0, 5.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    w = reward_weights(r, 1.0, "per_prompt", groups)
    for g in range(3):
        assert w[groups == g].mean().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(w[2:4], torch.ones(2))  # equal rewards within a group -> equal weights
    with pytest.raises(ValueError, match="group_ids"):
        reward_weights(r, 1.0, "per_prompt")


def test_none_and_uniform_weights():
    r = torch.tensor([0.0, 1.0, -2.0])
    torch.testing.assert_close(reward_weights(r, 0.5, "none"), torch.exp(0.5 * r))
    torch.testing.assert_close(reward_weights(r, 0.5, "uniform"), torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        reward_weights(torch.tensor([0.0, float("nan")]), 1.0, "batch")


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(8)).item() == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([8.0, 0, 0, 0])).item() == pytest.approx(1.0)


# --- loss ------------------------------------------------------------------------------------------
def test_uniform_rewards_without_w2_give_plain_flow_matching():
    v_pred, v_target, v_ref = _batch(3)
    weights = reward_weights(torch.full((6,), 0.7), temperature=0.5)
    out = orw_cfm_w2_loss(v_pred, v_target, v_ref, weights, w2_coefficient=0.0)
    plain = ((v_pred - v_target) ** 2).mean()
    torch.testing.assert_close(out.loss, plain)
    torch.testing.assert_close(out.fm_loss, plain)
    assert out.ess.item() == pytest.approx(6.0)


def test_loss_value_by_hand():
    v_pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    v_target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    v_ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weights = torch.tensor([1.5, 0.5])
    out = orw_cfm_w2_loss(v_pred, v_target, v_ref, weights, w2_coefficient=0.3)
    # fm = [(1+4)/2, (1+1)/2] = [2.5, 1]; w2 = [(0+4)/2, (0+4)/2] = [2, 2]
    expected = ((1.5 * 2.5 + 0.3 * 2) + (0.5 * 1 + 0.3 * 2)) / 2
    assert out.loss.item() == pytest.approx(expected)
    assert out.w2_loss.item() == pytest.approx(2.0)
    assert out.weighted_fm_loss.item() == pytest.approx((1.5 * 2.5 + 0.5) / 2)


def test_w2_gradient_matches_autograd():
    v_pred, v_target, v_ref = _batch(4, b=3, shape=(5,))
    v_pred.requires_grad_(True)
    weights = torch.tensor([0.5, 1.0, 1.5])
    alpha = 0.7
    orw_cfm_w2_loss(v_pred, v_target, v_ref, weights, alpha).loss.backward()
    b, d = v_pred.shape
    by_hand = (2 * weights[:, None] * (v_pred - v_target) + 2 * alpha * (v_pred - v_ref)) / (b * d)
    torch.testing.assert_close(v_pred.grad, by_hand.detach())


def test_loss_needs_the_reference_when_regularised():
    v_pred, v_target, _ = _batch(5)
    out = orw_cfm_w2_loss(v_pred, v_target, None, torch.ones(6), 0.0)
    assert out.w2_loss.item() == 0.0
    with pytest.raises(ValueError, match="v_ref"):
        orw_cfm_w2_loss(v_pred, v_target, None, torch.ones(6), 0.5)


def test_zero_reference_gap_gives_zero_w2():
    v_pred, v_target, _ = _batch(6)
    out = orw_cfm_w2_loss(v_pred, v_target, v_pred.clone(), torch.ones(6), 1.0)
    assert out.w2_loss.item() == 0.0
    assert math.isclose(out.loss.item(), out.fm_loss.item(), rel_tol=1e-6)
