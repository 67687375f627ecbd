"""The family contract, once for every family: tiny SD3, tiny FLUX.1-dev-like and tiny FLUX.1-schnell-like
pipelines, each built in code, saved, and loaded back through ``from_pretrained`` by the real trainer.

- a fresh adapter gives ``v_ft == v_ref`` exactly, so the W2 term is 0;
- a training round moves the adapter, and the adapter-disabled output equals an untouched base exactly;
- prompts are encoded once and the text encoders released;
- the saved LoRA loads into the family's plain diffusers pipeline and reproduces our sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from conftest import TINY_WORDS, sampled_and_pipeline_call, tiny_trainer
from conftest import velocity as _velocity, velocity_probe as _probe
from orw_diffusers import lora
from orw_diffusers.loss import orw_cfm_w2_loss
from orw_diffusers.weight_files import LORA_WEIGHTS_NAME
from orw_diffusers.trainer import Trainer

FAMILIES = ("sd3", "flux-dev", "flux-schnell")


@dataclass
class TinyCheckpoint:
    path: str
    family: str  # the FlowFamily subclass name load_family must pick
    # what the plain pipeline's from_pretrained needs (SD3 saved without T5 has null entries)
    pipeline_kwargs: dict = field(default_factory=dict)


def save_tiny_flux(tmp_path_factory, guidance_embeds: bool) -> str:
    import tiny_flux

    name = "tiny-flux-dev" if guidance_embeds else "tiny-flux-schnell"
    path = str(tmp_path_factory.mktemp(name) / "pipeline")
    tiny_flux.flux_pipeline(words=TINY_WORDS, guidance_embeds=guidance_embeds, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_flux_dev_path(tmp_path_factory) -> str:
    return save_tiny_flux(tmp_path_factory, guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory) -> str:
    return save_tiny_flux(tmp_path_factory, guidance_embeds=False)


@pytest.fixture(params=FAMILIES)
def checkpoint(request) -> TinyCheckpoint:
    if request.param == "sd3":
        return TinyCheckpoint(
            request.getfixturevalue("tiny_sd3_path"), "SD3Family", dict(text_encoder_3=None, tokenizer_3=None)
        )
    if request.param == "flux-dev":
        return TinyCheckpoint(request.getfixturevalue("tiny_flux_dev_path"), "FluxFamily")
    return TinyCheckpoint(request.getfixturevalue("tiny_flux_schnell_path"), "FluxFamily")


def _trainer(checkpoint: TinyCheckpoint, tmp_path, **overrides) -> Trainer:
    trainer = tiny_trainer(checkpoint.path, tmp_path, **overrides)
    assert type(trainer.family).__name__ == checkpoint.family
    return trainer


def test_fresh_adapter_equals_reference_and_w2_is_zero(checkpoint, tmp_path):
    trainer = _trainer(checkpoint, tmp_path)
    model, probe = trainer.unwrapped, _probe(trainer)
    v_ft = _velocity(trainer, model, probe)
    with lora.reference(model):
        v_ref = _velocity(trainer, model, probe)
    assert v_ft.shape == probe[0].shape
    assert torch.equal(v_ft, v_ref)
    out = orw_cfm_w2_loss(v_ft, torch.zeros_like(v_ft), v_ref, torch.ones(3), w2_coefficient=1.0)
    assert out.w2_loss.item() == 0.0
    # the reference context re-enables the trained adapter (not the sampler) for the next policy pass
    assert all(p.requires_grad for p in lora.lora_parameters(model, lora.TRAINED))
    assert not any(p.requires_grad for p in lora.lora_parameters(model, lora.SAMPLER))
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model, None))


def test_training_moves_the_adapter_but_not_the_reference(checkpoint, tmp_path):
    trainer = _trainer(checkpoint, tmp_path, train_batch_size=8, sample_batch_size=8, learning_rate=1e-2)
    model, probe = trainer.unwrapped, _probe(trainer)
    metrics = trainer.run_round(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["loss"], metrics["reward_mean"], metrics["w2_loss"]))
    v_ft = _velocity(trainer, model, probe)
    with lora.reference(model):
        v_ref = _velocity(trainer, model, probe)
    untouched = type(trainer.family.transformer).from_pretrained(checkpoint.path, subfolder="transformer").eval()
    v_base = _velocity(trainer, untouched, probe)
    assert not torch.allclose(v_ft, v_ref)
    assert torch.equal(v_ref, v_base)  # the frozen base weights did not move by a single bit


def test_prompt_cache_encodes_each_prompt_once_then_releases_encoders(checkpoint, tmp_path):
    trainer = _trainer(checkpoint, tmp_path, prompts=["a red cat", "a blue dog", "a red cat"])
    assert trainer.family.text_encoder_calls == 3  # 2 unique prompts + the negative prompt ""
    assert trainer.family.text_encoders() == []
    trainer.run_round(0)
    assert trainer.family.text_encoder_calls == 3
    with pytest.raises(KeyError, match="not in the prompt cache"):
        trainer.family.prompt_cache.get(["an unseen prompt"], trainer.device)


def test_saved_lora_reproduces_the_sampler_in_a_plain_pipeline(checkpoint, tmp_path):
    """Our Euler sampler (+ decode) with the trained adapter == the family's own diffusers pipeline
    with ``load_lora_weights``, from the same initial noise (packed for FLUX), the same steps and the
    same ``guidance_scale`` (true CFG for SD3, the guidance embedding for FLUX.1-dev)."""
    from diffusers import DiffusionPipeline

    trainer = _trainer(checkpoint, tmp_path, num_epochs=2, learning_rate=1e-2)
    trainer.train()
    ours, kwargs = sampled_and_pipeline_call(trainer)

    pipe = DiffusionPipeline.from_pretrained(checkpoint.path, **checkpoint.pipeline_kwargs)
    assert type(pipe) is type(trainer.family.pipeline)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(**kwargs).images
    pipe.load_lora_weights(trainer.cfg.output_dir, weight_name=LORA_WEIGHTS_NAME)
    tuned = pipe(**kwargs).images
    torch.testing.assert_close(tuned, ours, atol=1e-5, rtol=1e-4)
    assert (tuned - base).abs().max() > 1e-4  # the adapter matters: not a vacuous match
