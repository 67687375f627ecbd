"""FLUX.1-specific behaviour on tiny dev-like / schnell-like pipelines built in code and loaded via from_pretrained:
packed latents, the pipeline's sigma schedule, the guidance embedding instead of true CFG, bf16 only,
and the real training script end to end in bf16.

The family contract shared with SD3 (zero adapter, frozen reference, prompt cache, LoRA round trip
through ``FluxPipeline.load_lora_weights``) is in ``test_family_contract.py``.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TRAIN_SCRIPT, tiny_run_config
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig
from orw_diffusers.models import FluxFamily, LoadOptions, check_model_precision, load_family
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer
from test_family_contract import tiny_flux_dev_path, tiny_flux_schnell_path  # noqa: F401 (fixtures)


def _load(path: str, **options) -> FluxFamily:
    family = load_family(LoadOptions(path, max_sequence_length=8, **options), torch.float32)
    assert isinstance(family, FluxFamily)
    return family


def _cond(family: FluxFamily, prompts=("a red cat", "a blue dog")):
    with torch.no_grad():
        return family.encode_prompts(list(prompts), torch.device("cpu"))


def test_latents_are_packed_and_decode_unpacks_them(tiny_flux_dev_path):
    from diffusers import FluxPipeline

    family = _load(tiny_flux_dev_path)
    # 16 px / VAE factor 2 = 8x8 latents of 4 channels -> 4x4 tokens of 2x2x4 = 16 channels
    assert family.latent_shape(16) == (16, 16)
    assert family.latent_shape(32) == (64, 16)
    with pytest.raises(ConfigError, match="resolution: 18 must be a multiple of 4"):
        family.latent_shape(18)
    cond = _cond(family)
    assert cond.tensors["prompt_embeds"].shape == (2, 8, 32)  # T5 sequence [B, max_sequence_length, d_model]
    assert cond.tensors["pooled"].shape == (2, 16)  # CLIP pooled [B, hidden]

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 8)
    vae = family.vae
    with torch.no_grad():
        images = family.decode(packed)
        expected = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=0, rtol=0)
    assert images.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sampling_sigmas_are_the_pipelines(variant, request):
    """dev shifts linspace(1, 1/N, N) by mu(image_seq_len); schnell keeps its fixed shift of 1."""
    path = request.getfixturevalue(f"tiny_flux_{variant}_path")
    family = _load(path)
    family.configure_guidance(3.5)
    steps = 5
    sigmas = family.sampling_sigmas(steps, family.latent_shape(32))
    pipe = family.pipeline
    pipe(prompt="a cat", height=32, width=32, num_inference_steps=steps, output_type="latent", max_sequence_length=8)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    plain = torch.cat([torch.linspace(1.0, 1 / steps, steps), torch.zeros(1)])
    assert torch.allclose(sigmas, plain) == (variant == "schnell")


def test_guidance_goes_to_the_embedding_not_to_true_cfg(tiny_flux_dev_path, tiny_flux_schnell_path, caplog):
    dev = _load(tiny_flux_dev_path)
    probe = (torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8]), _cond(dev))
    with pytest.raises(RuntimeError, match="configure_guidance"):
        dev.predict_velocity(dev.transformer, *probe)
    velocities = {}
    for scale in (1.0, 3.5):
        assert dev.configure_guidance(scale) == 1.0  # the sampler runs no unconditional pass
        assert dev.embedded_guidance == scale
        with torch.no_grad():
            velocities[scale] = dev.predict_velocity(dev.transformer, *probe)
    assert not torch.allclose(velocities[1.0], velocities[3.5])  # the embedding is really fed

    schnell = _load(tiny_flux_schnell_path)
    with caplog.at_level(logging.WARNING, logger="orw_diffusers.models.flux"):
        assert schnell.configure_guidance(3.5) == 1.0
    assert "ignored" in caplog.text
    with torch.no_grad():
        assert schnell.predict_velocity(schnell.transformer, *probe[:2], _cond(schnell)).shape == (2, 16, 16)


def test_trainer_feeds_the_same_guidance_to_sampling_and_training(tiny_flux_dev_path, tmp_path):
    """Every transformer call of a round (sampling, reference, policy) gets guidance = guidance_scale,
    timestep = sigma in [0, 1], and a batch never doubled by true CFG."""
    from rewards_for_tests import brightness

    cfg = TrainConfig(**tiny_run_config(tiny_flux_dev_path, str(tmp_path / "out"), guidance_scale=3.0, num_epochs=1))
    trainer = Trainer(cfg, reward_fn=brightness)
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].clone(), kwargs["timestep"].clone()))

    handle = trainer.unwrapped.register_forward_pre_hook(record, with_kwargs=True)
    try:
        trainer.run_round(0)
    finally:
        handle.remove()
    sampling_calls = cfg.num_sampling_steps * (8 // cfg.sample_batch_size)
    training_calls = 2 * (8 // cfg.train_batch_size)  # reference + policy per micro-batch
    assert len(calls) == sampling_calls + training_calls
    for batch, guidance, timestep in calls:
        assert batch == 4
        assert torch.equal(guidance, torch.full((4,), 3.0))
        assert timestep.min() >= 0 and timestep.max() <= 1


def test_fp16_is_refused_before_loading_with_one_line(tiny_flux_dev_path, tiny_sd3_path):
    with pytest.raises(ConfigError) as err:
        check_model_precision(tiny_flux_dev_path, None, "fp16")
    message = str(err.value)
    assert message.startswith("mixed_precision: fp16 is not supported by FluxFamily: ")
    assert "bf16" in message and "\n" not in message
    for ok in ("bf16", "no"):
        check_model_precision(tiny_flux_dev_path, None, ok)
    check_model_precision(tiny_sd3_path, None, "fp16")  # SD3 runs in fp16
    with pytest.raises(ConfigError, match="mixed_precision: fp16 is not supported by FluxFamily"):
        load_family(LoadOptions(tiny_flux_dev_path), torch.float16)


def test_flux_load_options_are_checked(tiny_flux_dev_path):
    with pytest.raises(ConfigError, match="load_t5: false"):
        _load(tiny_flux_dev_path, load_t5=False)
    with pytest.raises(ConfigError, match="max_sequence_length: 600"):
        load_family(LoadOptions(tiny_flux_dev_path, max_sequence_length=600), torch.float32)


# --- the real script ------------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_trains_flux_dev_in_bf16(tiny_flux_dev_path, tmp_path, fresh_accelerate_state):
    """``mixed_precision: bf16`` autocasts for real on CPU: bf16 frozen weights, fp32 LoRA."""
    from diffusers import FluxPipeline

    out = tmp_path / "out"
    run = tmp_path / "run.yaml"
    values = tiny_run_config(tiny_flux_dev_path, str(out), mixed_precision="bf16", guidance_scale=3.5)
    run.write_text(yaml.safe_dump(values))
    assert _script().main(["--config", str(run)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert torch.isfinite(torch.tensor([r["loss"], r["reward_mean"], r["w2_loss"], r["grad_norm"]])).all()
    weights = load_file(str(out / LORA_WEIGHTS_NAME))
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev_path, dtype=torch.bfloat16)
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHTS_NAME)  # loads without missing/unexpected keys


def test_script_refuses_flux_fp16_with_exit_2(tiny_flux_dev_path, tmp_path, capsys, fresh_accelerate_state):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_config(tiny_flux_dev_path, str(tmp_path / "out"), mixed_precision="fp16")))
    assert _script().main(["--config", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mixed_precision: fp16 is not supported by FluxFamily")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_flow_grpo_runs_a_round_on_flux_dev(tiny_flux_dev_path, tmp_path):
    from conftest import for_objective
    from rewards_for_tests import brightness

    values = for_objective(tiny_run_config(tiny_flux_dev_path, str(tmp_path / "out"), guidance_scale=3.0), "flow_grpo",
                           sde_window_size=2)  # fmt: skip
    trainer = Trainer(TrainConfig(**values), reward_fn=brightness)
    metrics = trainer.run_round(0)
    assert trainer.training_guidance_scale == 1.0  # guidance-distilled: no true CFG in the loss either
    assert math.isfinite(metrics["loss"]) and metrics["log_prob_gap"] == pytest.approx(0.0, abs=1e-3)
