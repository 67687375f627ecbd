"""CFG-consistent training: with guidance the loss trains the guided field the sampler integrates."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_trainer

from orw_diffusers import lora
from orw_diffusers.config import TrainConfig, validate
from orw_diffusers.errors import ConfigError
from orw_diffusers.objectives import Signal


def _adapter(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lora.lora_parameters(trainer.unwrapped, lora.TRAINED)]


def test_guided_and_conditional_give_bitwise_identical_updates_at_guidance_1(tiny_sd3_path, tmp_path):
    """The two modes train different fields under guidance (the updates differ at g = 2, so this comparison can
    fail), and one field without it (bitwise equal at g = 1)."""
    updates = {}
    for g in (1.0, 2.0):
        for mode in ("guided", "conditional"):
            trainer = tiny_trainer(tiny_sd3_path, tmp_path / f"{mode}-{g}", guidance_scale=g, cfg_training=mode)
            assert trainer.training_guidance_scale == (g if mode == "guided" else 1.0)
            trainer.run_round(0)
            updates[mode, g] = _adapter(trainer)
    assert any(p.abs().max() > 0 for p in updates["guided", 1.0])  # something was trained
    assert all(torch.equal(a, b) for a, b in zip(updates["guided", 1.0], updates["conditional", 1.0]))
    assert not all(torch.allclose(a, b) for a, b in zip(updates["guided", 2.0], updates["conditional", 2.0]))


def test_the_loss_velocity_is_what_the_sampler_integrates(tiny_sd3_path, tmp_path):
    trainer = tiny_trainer(tiny_sd3_path, tmp_path, guidance_scale=3.0)
    assert trainer.training_guidance_scale == 3.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter, copied into the sampler
        for p in lora.lora_parameters(trainer.unwrapped, lora.TRAINED):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    trainer.policy.refresh(trainer.unwrapped)
    prompts = ["a red cat", "a blue dog"]
    x, sigmas = torch.randn((2, *trainer.latent_shape), generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        fields = trainer.training_fields(prompts)
        v_loss, v_ref = fields.policy(x, sigmas), fields.reference(x, sigmas)
        with trainer.rollouts.sampler_field(prompts) as field_fn:
            v_sampled = field_fn(x, sigmas)
        cond = trainer.family.conditioning(prompts, trainer.device)
        v_cond = trainer.family.predict_velocity(trainer.unwrapped, x, sigmas, cond)
    torch.testing.assert_close(v_loss, v_sampled, rtol=0, atol=0)
    assert (v_loss - v_cond).abs().max() > 1e-3  # guidance changes the field: the test would see v_c
    assert (v_loss - v_ref).abs().max() > 1e-4  # the reference has the adapter off


@pytest.mark.parametrize("mode", ["guided", "conditional"])
def test_a_fresh_adapter_has_zero_w2_in_both_modes(tiny_sd3_path, tmp_path, mode):
    # one micro-batch per round, so the loss is measured before the first optimizer step
    trainer = tiny_trainer(tiny_sd3_path, tmp_path, guidance_scale=2.0, cfg_training=mode, train_batch_size=8,
                           sample_batch_size=8)  # fmt: skip
    rollout = trainer.rollout(0)
    stats = trainer.optimise(rollout, Signal(torch.ones(len(rollout.indices))), 0)
    assert stats["w2_loss"].item() == 0.0
    assert stats["fm_loss"].item() > 0


def test_conditional_training_with_guidance_warns_once(tiny_sd3_path, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="orw_diffusers"):
        trainer = tiny_trainer(tiny_sd3_path, tmp_path, guidance_scale=2.0, cfg_training="conditional")
    warnings = [r for r in caplog.records if "cfg_training: conditional" in r.getMessage()]
    assert len(warnings) == 1 and "run away" in warnings[0].getMessage()
    assert trainer.training_guidance_scale == 1.0


def test_cfg_training_value_is_checked(tiny_sd3_path, tmp_path):
    from conftest import tiny_run_config

    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, str(tmp_path), cfg_training="both"))
    with pytest.raises(ConfigError, match=r"cfg_training: 'both' is not one of guided, conditional"):
        validate(cfg)
