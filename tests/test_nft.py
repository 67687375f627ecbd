"""DiffusionNFT: the implicit-policy loss (limits, a hand-computed case, the flow-matching reduction), the
optimality probability, the sampler's soft update under both policies, its keys, and runs through the loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import first_micro_batch, for_objective, left_bright_gain, lora_changes_a_plain_sd3_pipeline, tiny_run_config

from orw_diffusers.config import TrainConfig, from_dict, validate
from orw_diffusers.errors import ConfigError
from orw_diffusers.flow import interpolate, target_velocity
from orw_diffusers.loss import diffusion_nft_loss, optimality_probability
from orw_diffusers.policies import FullPolicy, LoRAPolicy
from orw_diffusers.trainer import Trainer
from test_family_contract import tiny_flux_dev_path  # noqa: F401 (fixture)


def _state(seed=0, shape=(3, 2, 4, 4)):
    """x0, eps, t, x_t, v_old, v_theta: a micro-batch of 3 at one timestep each."""
    g = torch.Generator().manual_seed(seed)
    x0, eps, v_old, v_theta = (torch.randn(shape, generator=g) for _ in range(4))
    t = torch.rand(shape[0], generator=g) * 0.8 + 0.1
    return x0, eps, t, interpolate(x0, eps, t), v_old, v_theta


def _grad(beta, r, space="x0", scale=1.0):
    x0, eps, t, x_t, v_old, v_theta = _state()
    v = v_theta.clone().requires_grad_(True)
    out = diffusion_nft_loss(v, v_old, None, x0, x_t, t, r, beta, 0.0, scale, space)
    out.loss.backward()
    return v.grad


# --- the math ---------------------------------------------------------------------------------------------
def test_optimality_probability_maps_clipped_advantages_into_0_1():
    a = torch.tensor([-9.0, -5.0, -1.0, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(optimality_probability(a, 5.0), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(a, 1.0), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]))


def test_the_loss_by_hand():
    """One sample of two elements, beta = 0.5, r = 0.8, t = 0.5, scale 5, kl_beta 0.1."""
    x0 = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([0.5])
    x_t = interpolate(x0, eps, t)  # [0.5, 0.5]
    v_old, v_theta, v_ref = torch.tensor([[-1.0, 1.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    out = diffusion_nft_loss(v_theta, v_old, v_ref, x0, x_t, t, torch.tensor([0.8]), 0.5, 0.1, 5.0)
    # v+ = 0.5 v_theta + 0.5 v_old = [-0.5, 2]; x0hat+ = x_t - 0.5 v+ = [0.75, -0.5]; error [-0.25, 0.5]
    positive = (0.25**2 + 0.5**2) / 2 / ((0.25 + 0.5) / 2)
    # v- = 1.5 v_old - 0.5 v_theta = [-1.5, 0]; x0hat- = [1.25, 0.5]; error [0.25, 1.5]
    negative = (0.25**2 + 1.5**2) / 2 / ((0.25 + 1.5) / 2)
    policy = 5.0 * (0.8 * positive + 0.2 * negative) / 0.5
    kl = (0.0**2 + 2.0**2) / 2
    assert out.positive_loss.item() == pytest.approx(positive, rel=1e-6)
    assert out.negative_loss.item() == pytest.approx(negative, rel=1e-6)
    assert out.policy_loss.item() == pytest.approx(policy, rel=1e-6)
    assert out.kl.item() == pytest.approx(kl)
    assert out.loss.item() == pytest.approx(policy + 0.1 * kl, rel=1e-6)
    assert out.old_gap.item() == pytest.approx((1.0 + 4.0) / 2)
    # the paper's velocity-space form: ||v+- - (eps - x0)||^2, u = [-1, 3]
    vel = diffusion_nft_loss(v_theta, v_old, None, x0, x_t, t, torch.tensor([0.8]), 0.5, 0.0, 1.0, "velocity")
    assert vel.positive_loss.item() == pytest.approx((0.5**2 + 1.0**2) / 2)
    assert vel.negative_loss.item() == pytest.approx((0.5**2 + 3.0**2) / 2)


@pytest.mark.parametrize("space", ["x0", "velocity"])
def test_beta_to_zero_the_gradient_is_the_signed_advantage_times_the_matching_gradient(space):
    """beta -> 0: grad_v L -> scale (1 - 2 r_i) 2 t_i (x0hat_old - x0) / (B D w_old) (x0 form; velocity form:
    scale (1 - 2 r_i) 2 (u - v_old) / (B D)), whatever v_theta: signed, advantage-weighted matching at the
    sampler's prediction. The loss itself diverges as 1 / beta, by a constant in v_theta."""
    x0, eps, t, x_t, v_old, _ = _state()
    r = torch.tensor([1.0, 0.25, 0.5])
    b, d = x0.shape[0], x0[0].numel()
    tt = t.view(-1, 1, 1, 1)
    if space == "x0":
        error = x_t - tt * v_old - x0
        w = error.abs().mean(dim=(1, 2, 3), keepdim=True)
        limit = 5.0 * (1 - 2 * r).view(-1, 1, 1, 1) * 2 * tt * error / (d * w) / b
    else:
        limit = 5.0 * (1 - 2 * r).view(-1, 1, 1, 1) * 2 * (target_velocity(x0, eps) - v_old) / d / b
    for beta, tol in ((1e-2, 5e-2), (1e-4, 1e-3)):
        grad = _grad(beta, r, space, scale=5.0)
        assert (grad - limit).abs().max() / limit.abs().max() < tol, beta
    assert torch.all(_grad(1e-4, r, space)[2].abs() < 1e-3)  # r = 0.5: no pull at all in the limit
    # the divergent part: L * beta tends to scale * mean(term(v_old)), the same for every v_theta
    x0, eps, t, x_t, v_old, v_theta = _state()
    losses = [diffusion_nft_loss(v, v_old, None, x0, x_t, t, r, 1e-6, 0.0, 1.0, space).loss * 1e-6 for v in (v_theta, v_old)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-3)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_at_v_theta_equal_v_old_the_gradient_is_the_signed_advantage_weighted_matching_gradient(beta):
    """v_theta = v_old (a refreshed sampler): the gradient is scale (1 - 2r) = -A_clip (scale = c) times the
    gradient of the x0-matching term at v_old, the same for every beta."""
    x0, eps, t, x_t, v_old, _ = _state(2)
    r = torch.tensor([0.9, 0.3, 0.5])
    v = v_old.clone().requires_grad_(True)
    diffusion_nft_loss(v, v_old, None, x0, x_t, t, r, beta, 0.0, 5.0).loss.backward()
    tt = t.view(-1, 1, 1, 1)
    error = x_t - tt * v_old - x0
    w = error.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 5.0 * (1 - 2 * r).view(-1, 1, 1, 1) * 2 * tt * error / (x0[0].numel() * w) / 3
    torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-7)


def test_r_one_at_beta_one_is_flow_matching_towards_the_samples():
    """r = 1 for every sample, beta = 1: v+ = v_theta. In velocity space the loss is exactly scale times plain flow
    matching mean ||v_theta - (eps - x0)||^2; in x0 space it is flow matching with the per-sample weight
    t_i / sg(mean |v_theta,i - u_i|) (x0hat - x0 = t (u - v)): the same value, and the same gradient."""
    x0, eps, t, x_t, _, v_theta = _state(1)
    v_old = torch.randn_like(v_theta)  # irrelevant with r = 1 and beta = 1
    u = target_velocity(x0, eps)
    ones = torch.ones(3)
    v = v_theta.clone().requires_grad_(True)
    vel = diffusion_nft_loss(v, v_old, None, x0, x_t, t, ones, 1.0, 0.0, 2.0, "velocity")
    fm = ((v - u) ** 2).mean()
    torch.testing.assert_close(vel.loss, 2.0 * fm)
    (g_nft,) = torch.autograd.grad(vel.loss, v)
    (g_fm,) = torch.autograd.grad(2.0 * fm, v)
    torch.testing.assert_close(g_nft, g_fm)
    out = diffusion_nft_loss(v, v_old, None, x0, x_t, t, ones, 1.0, 0.0, 1.0, "x0")
    weight = t / (v - u).detach().abs().mean(dim=(1, 2, 3))
    weighted_fm = (weight * ((v - u) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(out.loss, weighted_fm)
    torch.testing.assert_close(torch.autograd.grad(out.loss, v)[0], torch.autograd.grad(weighted_fm, v)[0])


# --- the soft update through the policy seam -------------------------------------------------------------------
class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.proj_out(torch.tanh(self.proj_in(x)))


def _trained_and_sampler(policy_name: str):
    """(policy, module, trained weights, sampler weights as before): the trained weights moved off the sampler's."""
    torch.manual_seed(0)
    module = TwoLinear()
    policy = LoRAPolicy(4, None, ["proj_in", "proj_out"]) if policy_name == "lora" else FullPolicy()
    params = policy.attach(module)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    return policy, module


def _weights(policy, module, sampler):
    return {k: v.clone() for k, v in policy.export_weights(module, sampler=sampler).items()}


@pytest.mark.parametrize("policy_name", ["lora", "full"])
def test_soft_update_eta_zero_copies_eta_one_keeps_and_between_blends(policy_name):
    policy, module = _trained_and_sampler(policy_name)
    trained, old = _weights(policy, module, False), _weights(policy, module, True)
    assert any(not torch.equal(trained[k], old[k]) for k in trained)
    policy.soft_update(module, 1.0)
    assert all(torch.equal(_weights(policy, module, True)[k], old[k]) for k in old)
    policy.soft_update(module, 0.25)
    blended = _weights(policy, module, True)
    if policy_name == "full":  # the weights themselves blend (LoRA's A and B do: the next test)
        for k in old:
            torch.testing.assert_close(blended[k], 0.25 * old[k] + 0.75 * trained[k])
    else:
        assert any(not torch.equal(blended[k], old[k]) for k in old)
    policy.soft_update(module, 0.0)
    assert all(torch.equal(_weights(policy, module, True)[k], trained[k]) for k in trained)
    assert all(torch.equal(_weights(policy, module, False)[k], trained[k]) for k in trained)  # the trained untouched
    with pytest.raises(ValueError, match="must be in"):
        policy.soft_update(module, 1.5)


def test_lora_soft_update_blends_each_adapter_matrix():
    from orw_diffusers import lora

    policy, module = _trained_and_sampler("lora")
    new = {k: v.clone() for k, v in lora.adapter_state_dict(module, lora.TRAINED).items()}
    old = {k: v.clone() for k, v in lora.adapter_state_dict(module, lora.SAMPLER).items()}
    policy.soft_update(module, 0.3)
    blended = lora.adapter_state_dict(module, lora.SAMPLER)
    for k in new:
        torch.testing.assert_close(blended[k], 0.3 * old[k] + 0.7 * new[k])


# --- config ------------------------------------------------------------------------------------------------------
def _nft_values(path, out, **overrides):
    return for_objective(tiny_run_config(path, str(out)), "diffusion_nft", **overrides)


def test_kl_beta_defaults_to_each_objectives_own(tiny_sd3_path, tmp_path):
    assert from_dict(_nft_values(tiny_sd3_path, tmp_path)).kl_beta == 1e-4
    assert from_dict(for_objective(tiny_run_config(tiny_sd3_path, str(tmp_path)), "flow_grpo")).kl_beta == 0.04
    assert from_dict(_nft_values(tiny_sd3_path, tmp_path, kl_beta=0.0)).kl_beta == 0.0
    assert TrainConfig(objective="diffusion_nft").kl_beta == 1e-4
    with pytest.raises(ConfigError, match="nft_beta: belongs to objective 'diffusion_nft'"):
        from_dict({**tiny_run_config(tiny_sd3_path, str(tmp_path)), "nft_beta": 0.5})
    with pytest.raises(ConfigError, match="w2_coefficient: belongs to objective 'orw_cfm_w2'"):
        from_dict({**_nft_values(tiny_sd3_path, tmp_path), "w2_coefficient": 1.0})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nft_beta": 0.0}, r"^nft_beta: 0.0 must be > 0$"),
        ({"nft_loss_space": "eps"}, r"^nft_loss_space: 'eps' is not one of x0, velocity$"),
        ({"nft_timestep_fraction": 1.5}, r"^nft_timestep_fraction: 1.5 must be in \(0, 1\]$"),
        ({"nft_timestep_fraction": 0.0}, r"^nft_timestep_fraction: 0.0 must be in \(0, 1\]$"),
        ({"sampler_decay_rate": -0.1}, r"^sampler_decay_rate: -0.1 must be >= 0"),
        ({"sampler_decay_max": 1.0}, r"^sampler_decay_max: 1.0 must be in \[0, 1\)"),
        ({"sampler_decay_start": -1}, r"^sampler_decay_start: -1 must be >= 0$"),
        ({"kl_beta": -1.0}, r"^kl_beta: -1.0 must be >= 0"),
        ({"kl_beta": float("nan")}, r"^kl_beta: nan must be >= 0"),
        ({"adv_clip_max": 0.0}, r"^adv_clip_max: 0.0 must be > 0$"),
    ],
)
def test_bad_values_are_one_line_errors(tiny_sd3_path, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        validate(from_dict(_nft_values(tiny_sd3_path, tmp_path, **bad)))
    assert "\n" not in str(excinfo.value)


# --- through the loop -----------------------------------------------------------------------------------------
def test_a_fresh_adapter_with_a_refreshed_sampler_gives_v_plus_equal_v_minus_equal_v_old(tiny_sd3_path, tmp_path):
    from rewards_for_tests import darkness

    trainer = Trainer(TrainConfig(**_nft_values(tiny_sd3_path, tmp_path, num_sampling_steps=4)), reward_fn=darkness)
    rollout, batch, fields = first_micro_batch(trainer)
    assert rollout.extras["grid"].shape == (8, 4)
    assert 0.0 < batch.signal.min() and batch.signal.max() < 1.0
    x, sigmas = torch.randn(4, *trainer.latent_shape), torch.tensor([0.9, 0.7, 0.5, 0.3])
    with torch.no_grad():
        v_old, v_theta, v_ref = fields.sampler(x, sigmas), fields.policy(x, sigmas), fields.reference(x, sigmas)
    assert torch.equal(v_old, v_theta) and torch.equal(v_old, v_ref)
    steps = list(trainer.objective.losses(batch, fields))
    assert len(steps) == 3  # int(4 * 0.99) trained timesteps
    for step in steps:
        # v+ = v- = v_old exactly: both implicit policies' terms are one number
        assert step.metrics["old_gap"].item() == 0.0 and step.metrics["kl"].item() == 0.0
        assert step.metrics["positive_loss"].item() == step.metrics["negative_loss"].item()
        step.loss.backward()
    grads = [p.grad for p in trainer.params if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)  # the advantages reach the adapter
    order = trainer.objective.timestep_order(batch, 4)
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in order) and len({tuple(r) for r in order.tolist()}) > 1


def test_without_negatives_the_samples_below_their_group_mean_get_r_one_half(tiny_sd3_path, tmp_path):
    """nft_negatives: false keeps the signed r of the samples above their group's mean and gives the rest 0.5,
    which at v = v_old puts no gradient on them (the test above: the gradient is scale (1 - 2r) times ...)."""
    from orw_diffusers.objectives import build_objective

    rewards, groups = torch.tensor([0.1, 0.4, 0.9, 0.2, 0.6, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1])
    signed = build_objective(TrainConfig(**_nft_values(tiny_sd3_path, tmp_path))).signal(rewards, groups).values
    positive = build_objective(TrainConfig(**_nft_values(tiny_sd3_path, tmp_path, nft_negatives=False)))
    r = positive.signal(rewards, groups).values
    above = signed > 0.5
    assert above.any() and (~above).any()
    torch.testing.assert_close(r[above], signed[above])
    assert torch.all(r[~above] == 0.5)


def test_the_sampler_follows_by_the_decay_schedule(tiny_sd3_path, tmp_path):
    from orw_diffusers.objectives import build_objective

    objective = build_objective(TrainConfig(**_nft_values(tiny_sd3_path, tmp_path)))
    assert [objective.sampler_decay(s) for s in (0, 1, 100, 500, 5000)] == [0.0, 0.001, 0.1, 0.5, 0.5]
    delayed = build_objective(TrainConfig(**_nft_values(
        tiny_sd3_path, tmp_path, sampler_decay_start=75, sampler_decay_rate=0.0075, sampler_decay_max=0.999)))
    assert [delayed.sampler_decay(s) for s in (0, 75, 175)] == [0.0, 0.0, pytest.approx(0.75)]


@pytest.mark.parametrize("policy", ["lora", "full"])
def test_a_velocity_model_trains_under_both_policies_and_the_sampler_soft_updates(tmp_path, policy):
    from orw_diffusers.models.velocity import VelocityModel
    from test_velocity import tiny_mlp

    values = dict(objective="diffusion_nft", sampler_decay_rate=0.25, images_per_prompt=8, sample_batch_size=8,
                  train_batch_size=4)  # fmt: skip
    cfg = TrainConfig(model_factory=None, output_dir=str(tmp_path / policy), prompts=[""], num_epochs=1,
                      num_sampling_steps=3, guidance_scale=1.0, learning_rate=1e-2, rank=4, policy=policy,
                      report_to="none", sample_log_interval=0, seed=0, **values)  # fmt: skip
    trainer = Trainer(cfg, reward_fn=lambda im, p: im.mean((1, 2, 3)), model=VelocityModel(tiny_mlp()))
    before = {k: v.clone() for k, v in trainer.policy.export_weights(trainer.unwrapped, sampler=True).items()}
    metrics = trainer.run_round(0)
    assert math.isfinite(metrics["loss"]) and metrics["sampler_decay"] == 0.5  # 2 optimizer steps * 0.25
    trained = trainer.policy.export_weights(trainer.unwrapped)
    after = trainer.policy.export_weights(trainer.unwrapped, sampler=True)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved
    if policy == "full":
        for k in moved:
            torch.testing.assert_close(after[k], 0.5 * before[k] + 0.5 * trained[k])


def test_a_round_runs_on_flux_dev(tiny_flux_dev_path, tmp_path):
    from rewards_for_tests import brightness

    values = for_objective(tiny_run_config(tiny_flux_dev_path, str(tmp_path / "out"), guidance_scale=3.0), "diffusion_nft")
    trainer = Trainer(TrainConfig(**values), reward_fn=brightness)
    metrics = trainer.run_round(0)
    assert trainer.training_guidance_scale == 1.0
    for key in ("loss", "policy_loss", "positive_loss", "negative_loss", "kl", "old_gap", "r_mean", "sampler_decay"):
        assert math.isfinite(metrics[key]), key


def test_nft_raises_the_reward_of_a_flow_matched_pipeline(pretrained_tiny_sd3_path, tmp_path):
    """Round 0 samples the base; after a few rounds the reward is well above it (left_bright: about +-6)."""
    gain, rewards = left_bright_gain(_nft_values(
        pretrained_tiny_sd3_path, tmp_path, num_epochs=12, learning_rate=3e-3, images_per_prompt=8,
        sample_batch_size=8, train_batch_size=8, rank=8, guidance_scale=1.0, num_sampling_steps=4,
    ))  # fmt: skip
    assert gain > 1.5, rewards


def test_the_saved_lora_loads_into_a_plain_sd3_pipeline(tiny_sd3_path, tmp_path):
    from rewards_for_tests import darkness

    out = tmp_path / "out"
    Trainer(TrainConfig(**_nft_values(tiny_sd3_path, out, num_epochs=1, learning_rate=1e-2)), reward_fn=darkness).train()
    assert lora_changes_a_plain_sd3_pipeline(tiny_sd3_path, str(out))  # the adapter is not zero and diffusers applies it


def test_a_diffusion_nft_run_has_its_card_and_push(tiny_sd3_path, tmp_path):
    from test_hub import trained_card

    card, api = trained_card(tiny_sd3_path, tmp_path / "out", hub_model_id="tiny-nft", objective="diffusion_nft",
                             nft_beta=0.5)  # fmt: skip
    assert "diffusion-nft" in card.data.tags and "orw-cfm-w2" not in card.data.tags
    text = card.text
    assert text.lstrip().startswith("# DiffusionNFT LoRA adapter of") and "**DiffusionNFT**" in text
    for needle in ("| objective | DiffusionNFT (`diffusion_nft`) |", "| `nft_beta` | 0.5 |", "| `kl_beta` | 0.0001 |",
                   "| `sampler_decay_rate` | 0.001 |"):  # fmt: skip
        assert needle in text, needle
    assert "w2_coefficient" not in text and "Flow-GRPO" not in text
    assert api.commit_messages == ["DiffusionNFT LoRA: 1 rounds, 8 samples"]
