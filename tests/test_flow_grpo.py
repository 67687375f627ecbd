"""Flow-GRPO: the SDE step, advantages, the clipped ratio and KL, and runs through the shared loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import for_objective, tiny_run_config

from orw_diffusers.config import TrainConfig, from_dict, validate
from orw_diffusers.errors import ConfigError
from orw_diffusers.flow import euler_step
from orw_diffusers.loss import clipped_ratio_loss, group_advantages
from orw_diffusers.objectives.base import MicroBatch
from orw_diffusers.objectives.base import slice_extras
from orw_diffusers.rollouts import micro_batch_rows
from orw_diffusers.sde import sde_step, step_kl, window_steps
from orw_diffusers.trainer import Trainer


def _state(seed=0, shape=(3, 4, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x, v, eps = (torch.randn(shape, generator=g) for _ in range(3))
    return x, v, eps


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_with_zero_noise_the_step_is_the_euler_step(sde_type, sigma):
    x, v, eps = _state()
    s, s_next = torch.full((3,), sigma), torch.full((3,), sigma - 0.2)
    step = sde_step(x, v, s, s_next, 0.0, torch.full((3,), 0.9), noise=eps, sde_type=sde_type)
    torch.testing.assert_close(step.next_latents, euler_step(x, v, sigma, sigma - 0.2), rtol=0, atol=1e-6)
    assert torch.all(step.std == 0)


def test_sde_log_prob_is_the_gaussian_log_density_averaged_over_elements():
    x, v, eps = _state(1)
    a, sigma, sigma_next, sigma_max = 0.7, 0.6, 0.45, 0.9
    s, sn = torch.full((3,), sigma), torch.full((3,), sigma_next)
    step = sde_step(x, v, s, sn, a, torch.full((3,), sigma_max), noise=eps)
    dt = sigma_next - sigma
    diffusion = a * math.sqrt(sigma / (1 - sigma))
    mean = x + (v + diffusion**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = diffusion * math.sqrt(-dt)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.next_latents, mean + std * eps)
    density = torch.distributions.Normal(mean, std).log_prob(step.next_latents)
    torch.testing.assert_close(step.log_prob, density.mean(dim=(1, 2, 3)))
    # sigma = 1: sqrt(sigma / (1 - sigma)) takes 1 - sigma_max in its denominator
    one = sde_step(x, v, torch.ones(3), sn, a, torch.full((3,), sigma_max), noise=eps)
    torch.testing.assert_close(one.std, torch.full((3,), a * math.sqrt(1 / (1 - sigma_max)) * math.sqrt(1 - sigma_next)))


def test_cps_mean_and_log_prob():
    x, v, eps = _state(2)
    a, sigma, sigma_next = 0.5, 0.7, 0.5
    step = sde_step(x, v, torch.full((3,), sigma), torch.full((3,), sigma_next), a, torch.ones(3), noise=eps,
                    sde_type="cps")  # fmt: skip
    std = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.next_latents, mean + std * eps)
    torch.testing.assert_close(step.log_prob, -((step.next_latents - mean) ** 2).mean(dim=(1, 2, 3)))


def test_rescoring_the_drawn_latents_gives_their_log_prob():
    x, v, eps = _state(3)
    args = (x, v, torch.full((3,), 0.8), torch.full((3,), 0.7), 0.7, torch.full((3,), 0.9))
    drawn = sde_step(*args, noise=eps)
    rescored = sde_step(*args, next_latents=drawn.next_latents)
    assert torch.equal(drawn.log_prob, rescored.log_prob)
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(*args)


def test_group_advantages_mean_zero_std_one_clipped_and_masked():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 10.0, 0.0, 10.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    adv, keep = group_advantages(rewards, groups, global_std=False, clip=5.0)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4  # group 1 has no spread
    assert torch.all(adv[4:8] == 0)
    for g in (0, 2):
        a = adv[groups == g]
        assert abs(a.mean().item()) < 1e-6
        assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    adv_global, _ = group_advantages(rewards, groups, global_std=True, clip=5.0)
    batch_std = rewards.std(unbiased=False)
    torch.testing.assert_close(adv_global[:4], (rewards[:4] - 2.5) / (batch_std + 1e-4))
    clipped, _ = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4), global_std=False, clip=1.5)
    assert clipped.max().item() == 1.5 and clipped.min().item() == pytest.approx(-25 / (math.sqrt(1875) + 1e-4))


def test_one_image_per_prompt_takes_the_batch_as_the_group():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0])
    adv, keep = group_advantages(rewards, torch.arange(4), global_std=True, clip=5.0)
    assert keep.all()
    torch.testing.assert_close(adv, (rewards - 3.5) / (rewards.std(unbiased=False) + 1e-4))
    # beside a larger group, a group of one is still masked: it has no group statistics
    adv, keep = group_advantages(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 0, 1]), global_std=True, clip=5.0)
    assert keep.tolist() == [True, True, False] and adv[2] == 0


@pytest.mark.parametrize("sigma, sigma_next", [(0.8, 0.7), (0.5, 0.45), (1.0, 0.9)])
def test_the_kl_scales_by_hand(sigma, sigma_next):
    """flow_grpo: mean gap^2 / (2 (a sqrt(sigma/(1-sigma)))^2), Flow-GRPO's std_dev_t; exact: over the step's std^2,
    1/|dt| larger; with cps the two are one."""
    x, v, eps = _state(4)
    a, sigma_max, n = 0.7, 0.9, len(x)
    args = (x, v, torch.full((n,), sigma), torch.full((n,), sigma_next), a, torch.full((n,), sigma_max))
    step = sde_step(*args, noise=eps)
    ref_mean = step.mean + 0.3  # a constant gap of 0.3 in every element
    s = sigma_max if sigma == 1 else sigma
    diffusion = a * math.sqrt(sigma / (1 - s))
    torch.testing.assert_close(step_kl(step, ref_mean, "flow_grpo"), torch.full((n,), 0.09 / (2 * diffusion**2)))
    torch.testing.assert_close(
        step_kl(step, ref_mean, "exact"), torch.full((n,), 0.09 / (2 * diffusion**2 * (sigma - sigma_next)))
    )
    cps = sde_step(*args, noise=eps, sde_type="cps")
    torch.testing.assert_close(step_kl(cps, cps.mean + 0.3, "exact"), step_kl(cps, cps.mean + 0.3, "flow_grpo"))
    torch.testing.assert_close(step_kl(cps, cps.mean + 0.3, "exact"), torch.full((n,), 0.09 / (2 * (sigma_next * math.sin(a * math.pi / 2)) ** 2)))
    with pytest.raises(ValueError, match="kl_type 'kl' is not one of flow_grpo, exact"):
        step_kl(step, ref_mean, "kl")


def test_micro_batches_drop_masked_samples_and_pair_up_across_processes():
    assert [r.tolist() for r in micro_batch_rows(5, 2)] == [[0, 1], [2, 3], [4]]
    keep = torch.tensor([True, False, True, True, False, True, False, False, True, True, True, True])
    assert [r.tolist() for r in micro_batch_rows(12, 4, keep)] == [[0, 2, 3, 5], [8, 9, 10, 11]]
    # 2 processes: process p holds global samples p, p + 2, ...; its local rows j <-> global p + 2 j
    p0 = micro_batch_rows(6, 2, keep, 0, 2)  # global 0 2 4 6 8 10 -> kept locals 0 1 4 5
    p1 = micro_batch_rows(6, 2, keep, 1, 2)  # global 1 3 5 7 9 11 -> kept locals 1 2 4 5
    assert [r.tolist() for r in p0] == [[0, 1], [4, 5]] and [r.tolist() for r in p1] == [[1, 2], [4, 5]]
    # micro-batch m of both processes together is micro-batch m of one process with twice the batch
    for m, one in enumerate(micro_batch_rows(12, 4, keep)):
        both = sorted([0 + 2 * int(j) for j in p0[m]] + [1 + 2 * int(j) for j in p1[m]])
        assert both == one.tolist()
    # unbalanced: process 1 keeps 1 sample, process 0 keeps 4: both run 2 micro-batches, process 1's second is
    # one masked row (weighed 0), so that DDP's reductions pair up
    keep = torch.tensor([True, False, True, True, True, False, True, False])
    p0, p1 = micro_batch_rows(4, 2, keep, 0, 2), micro_batch_rows(4, 2, keep, 1, 2)
    assert [r.tolist() for r in p0] == [[0, 1], [2, 3]] and [r.tolist() for r in p1] == [[1], [0]]
    assert not keep[1 + 2 * 0]  # the padding row is a masked sample
    assert micro_batch_rows(4, 2, torch.zeros(8, dtype=torch.bool), 0, 2) == []


def test_clipped_ratio_loss_by_hand():
    log_prob, old = torch.tensor([0.0, 0.1, -0.1]), torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, ratio = clipped_ratio_loss(log_prob, old, adv, clip_range=0.05)
    torch.testing.assert_close(ratio, torch.exp(log_prob))
    # A > 0, rho > 1 + eps: the clipped value; A < 0, rho < 1 - eps: the clipped value
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.05, 0.95]))


def test_window_steps():
    g = torch.Generator().manual_seed(0)
    assert window_steps(10, 0, 0, 5, g) == list(range(9))
    for _ in range(20):
        steps = window_steps(10, 2, 0, 5, g)
        assert len(steps) == 2 and steps[0] >= 0 and steps[-1] <= 4 and steps[1] == steps[0] + 1


def _grpo_values(path, out, **overrides):
    return for_objective(tiny_run_config(path, str(out)), "flow_grpo", **overrides)


def test_config_keys_belong_to_their_objective(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError, match="w2_coefficient: belongs to objective 'orw_cfm_w2'"):
        from_dict({**_grpo_values(tiny_sd3_path, tmp_path), "w2_coefficient": 1.0})
    with pytest.raises(ConfigError, match="kl_beta: belongs to objective 'flow_grpo'"):
        from_dict({**tiny_run_config(tiny_sd3_path, str(tmp_path)), "kl_beta": 0.1})
    for bad, match in (
        ({"sde_type": "ode"}, "sde_type: 'ode' is not one of sde, cps"),
        ({"sde_window_size": 9}, "sde_window_size: 9 must be between 0"),
        ({"sde_window_size": 2, "sde_window_range": [3, 4]}, "sde_window_range"),
        ({"sampling_solver": "heun"}, "sampling_solver: 'heun' is not supported by objective flow_grpo"),
        ({"kl_beta": -1.0}, "kl_beta: -1.0 must be >= 0"),
        ({"kl_type": "kl"}, "kl_type: 'kl' is not one of flow_grpo, exact"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate(from_dict(_grpo_values(tiny_sd3_path, tmp_path, **bad)))


def _first_micro_batch(trainer, round_idx=0):
    rollout = trainer.rollout(round_idx)
    global_rewards = trainer.gather_global(rollout.rewards, rollout.indices)
    groups = torch.tensor([trainer.prompt_ids[p] for p in trainer.sample_prompts(round_idx)])
    signal = trainer.objective.signal(global_rewards, groups).values[rollout.indices]
    bs = trainer.cfg.train_batch_size
    rows = torch.arange(bs)
    batch = MicroBatch(round_idx, 0, trainer.cfg.seed, rollout.indices[rows], rollout.latents[rows], signal[rows],
                       slice_extras(rollout.extras, rows))  # fmt: skip
    return rollout, batch, trainer.training_fields(rollout.prompts[:bs])


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_the_ratio_is_one_on_the_first_micro_batch_and_kl_zero_for_a_fresh_adapter(tiny_sd3_path, tmp_path, sde_type):
    from rewards_for_tests import darkness

    cfg = TrainConfig(**_grpo_values(tiny_sd3_path, tmp_path, sde_type=sde_type, sde_window_size=2,
                                     sample_batch_size=4, train_batch_size=4))  # fmt: skip
    trainer = Trainer(cfg, reward_fn=darkness)
    rollout, batch, fields = _first_micro_batch(trainer)
    assert rollout.extras["step_latents"].shape[1] == 2  # the window's two steps were recorded
    steps = list(trainer.objective.losses(batch, fields))
    assert len(steps) == 2
    for step in steps:
        assert step.metrics["log_prob_gap"].item() == 0.0  # rho = exp(0) = 1 exactly
        assert step.metrics["clip_fraction"].item() == 0.0
        assert step.metrics["kl"].item() == 0.0  # the adapter is fresh: policy == reference
        step.loss.backward()
    grads = [p.grad for p in trainer.params if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)  # the advantages reach the adapter


def test_in_bf16_the_stored_trajectory_rescores_to_log_rho_zero(tiny_sd3_path, tmp_path, fresh_accelerate_state):
    """Frozen weights in bf16 under real autocast: the rollout's steps are kept in float32, so re-scoring them with
    identical weights gives log rho = 0 on every trained step (a step rounded to bf16 gave about 1e-4 here)."""
    from rewards_for_tests import darkness

    cfg = TrainConfig(**_grpo_values(tiny_sd3_path, tmp_path, sde_window_size=3, sample_batch_size=4,
                                     train_batch_size=4, mixed_precision="bf16"))  # fmt: skip
    trainer = Trainer(cfg, reward_fn=darkness)
    assert trainer.weight_dtype == torch.bfloat16
    rollout, batch, fields = _first_micro_batch(trainer)
    assert rollout.extras["step_latents"].dtype == rollout.extras["step_next_latents"].dtype == torch.float32
    assert rollout.latents.dtype == torch.bfloat16  # x1, as every objective returns it
    steps = list(trainer.objective.losses(batch, fields))
    assert len(steps) == 3
    for step in steps:
        assert step.metrics["log_prob_gap_abs"].item() <= 1e-7
        assert step.metrics["clip_fraction"].item() == 0.0


def test_one_image_per_prompt_trains_on_batch_advantages(tiny_sd3_path, tmp_path, caplog):
    from rewards_for_tests import darkness

    prompts = ["a red cat", "a dark dog", "a blue car", "a green tree"]
    cfg = TrainConfig(**_grpo_values(tiny_sd3_path, tmp_path, sde_window_size=2, images_per_prompt=1, prompts=prompts,
                                     sample_batch_size=4, train_batch_size=2))  # fmt: skip
    trainer = Trainer(cfg, reward_fn=darkness)
    with caplog.at_level("INFO", logger="orw_diffusers"):
        metrics = trainer.run_round(0)
        trainer.run_round(1)
    assert metrics["masked_fraction"] == 0.0 and metrics["trained_samples"] == 4
    assert metrics["adv_abs_mean"] > 0 and metrics["grad_norm"] > 0
    said = [r.getMessage() for r in caplog.records if "one sample per prompt" in r.getMessage()]
    assert len(said) == 1  # logged once, not every round


def test_masked_samples_are_dropped_and_warned_about(tiny_sd3_path, tmp_path, caplog):
    """A reward that is equal within one of two prompt groups: that group is masked, not trained on, and the
    micro-batches hold only the other group's samples, each at the weight 1 / train_batch_size."""
    def equal_for_cats(images, prompts):
        return torch.tensor([0.0 if "cat" in p else float(images[i].mean()) for i, p in enumerate(prompts)])

    prompts = ["a red cat", "a dark dog"]
    cfg = TrainConfig(**_grpo_values(tiny_sd3_path, tmp_path, sde_window_size=1, images_per_prompt=4, prompts=prompts,
                                     sample_batch_size=4, train_batch_size=2))  # fmt: skip
    trainer = Trainer(cfg, reward_fn=equal_for_cats)
    seen = []
    original = trainer.objective.losses

    def spy(batch, fields):
        seen.append((batch.indices.tolist(), batch.signal[:, 1].tolist()))
        return original(batch, fields)

    trainer.objective.losses = spy
    with caplog.at_level("WARNING", logger="orw_diffusers"):
        metrics = trainer.run_round(0)
    cats = [i for i, p in enumerate(trainer.sample_prompts(0)) if "cat" in p]
    assert metrics["masked_fraction"] == 0.5 and metrics["trained_samples"] == 4
    assert len(seen) == 2 and all(keep == [1.0, 1.0] for _, keep in seen)  # two full micro-batches of kept samples
    assert not set(cats) & {i for rows, _ in seen for i in rows}
    assert any("50% of a round's samples are masked" in r.getMessage() for r in caplog.records)


def test_conditional_training_under_guidance_is_refused(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError, match="cfg_training: 'conditional' with guidance_scale 2.0 is refused by objective"):
        validate(from_dict(_grpo_values(tiny_sd3_path, tmp_path, cfg_training="conditional", guidance_scale=2.0)))
    validate(from_dict(_grpo_values(tiny_sd3_path, tmp_path, cfg_training="conditional", guidance_scale=1.0)))
    cfg = from_dict(_grpo_values(tiny_sd3_path, tmp_path, guidance_scale=2.0))
    assert cfg.cfg_training == "guided"
    validate(cfg)


def test_a_round_runs_and_logs_the_objectives_metrics(tiny_sd3_path, tmp_path):
    from rewards_for_tests import darkness

    trainer = Trainer(TrainConfig(**_grpo_values(tiny_sd3_path, tmp_path, sde_window_size=2)), reward_fn=darkness)
    metrics = trainer.run_round(0)
    for key in ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "log_prob_gap", "adv_abs_mean",
                "masked_fraction", "reward_mean", "grad_norm"):  # fmt: skip
        assert key in metrics and math.isfinite(metrics[key]), key
    assert "w2_loss" not in metrics and "ess" not in metrics


def test_flow_grpo_raises_the_reward_of_a_flow_matched_pipeline(pretrained_tiny_sd3_path, tmp_path):
    """Round 0 samples the base; after a few rounds the reward is well above it (left_bright: about +-6)."""
    from accelerate.state import AcceleratorState

    from rewards_for_tests import left_bright

    AcceleratorState._reset_state(True)
    cfg = TrainConfig(**_grpo_values(
        pretrained_tiny_sd3_path, tmp_path, num_epochs=12, learning_rate=3e-3, images_per_prompt=8,
        sample_batch_size=8, train_batch_size=8, rank=8, guidance_scale=1.0, num_sampling_steps=8,
        sde_window_size=3, kl_beta=0.0,
    ))  # fmt: skip
    trainer = Trainer(cfg, reward_fn=left_bright)
    rewards = [trainer.run_round(r)["reward_mean"] for r in range(cfg.num_epochs)]
    assert sum(rewards[-4:]) / 4 > rewards[0] + 1.5, rewards


def test_the_saved_lora_loads_into_a_plain_sd3_pipeline(tiny_sd3_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from rewards_for_tests import darkness

    out = tmp_path / "out"
    cfg = TrainConfig(**_grpo_values(tiny_sd3_path, out, num_epochs=1, sde_window_size=2, learning_rate=1e-2))
    Trainer(cfg, reward_fn=darkness).train()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    kwargs = dict(prompt="a red cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                  max_sequence_length=8)  # fmt: skip
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out))
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 0  # the trained adapter is not zero and diffusers applies it
