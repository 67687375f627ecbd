"""The SD3 family, the adapters and the sampler on a tiny pipeline loaded via from_pretrained (what every family
does is tests/test_family_contract.py's)."""

import pytest
import torch

from conftest import tiny_trainer as _trainer
from orw_diffusers import lora
from orw_diffusers.objectives import Signal


def _lora_tensors(model, adapter):
    return [p.detach().clone() for p in lora.lora_parameters(model, adapter)]


def test_sampler_lags_by_one_round_with_interval_two(tiny_sd3_path, tmp_path):
    trainer = _trainer(tiny_sd3_path, tmp_path, sampler_update_interval=2)
    model = trainer.unwrapped
    initial = _lora_tensors(model, lora.TRAINED)
    assert all(torch.equal(a, b) for a, b in zip(initial, _lora_tensors(model, lora.SAMPLER)))
    m0 = trainer.run_round(0)
    trained, sampler = _lora_tensors(model, lora.TRAINED), _lora_tensors(model, lora.SAMPLER)
    assert not m0["sampler_refreshed"]
    assert any(not torch.equal(a, b) for a, b in zip(trained, initial))
    assert all(torch.equal(a, b) for a, b in zip(sampler, initial))  # still the round-0 policy
    m1 = trainer.run_round(1)
    assert m1["sampler_refreshed"]
    assert all(torch.equal(a, b) for a, b in zip(_lora_tensors(model, lora.TRAINED), _lora_tensors(model, lora.SAMPLER)))


@pytest.mark.parametrize("solver, calls", [("euler", 3), ("heun", 5)])
def test_rollouts_use_the_configured_solver(tiny_sd3_path, tmp_path, solver, calls):
    trainer = _trainer(tiny_sd3_path, tmp_path, num_sampling_steps=3, sampling_solver=solver)
    predict, calls_made = trainer.family.predict_velocity, []

    def counting_predict(*args):
        calls_made.append(1)
        return predict(*args)

    trainer.family.predict_velocity = counting_predict
    latents = trainer.rollouts.record(["a red cat"], torch.tensor([0]), round_idx=0).latents
    assert len(calls_made) == calls and torch.isfinite(latents).all()


def test_optimise_fetches_prompt_embeddings_per_micro_batch(tiny_sd3_path, tmp_path):
    """The round's conditioning is never built at once: each micro-batch takes its own rows from the
    prompt cache, in sample order, then (guided training) its negative prompts, so memory does not
    grow with the round."""
    trainer = _trainer(tiny_sd3_path, tmp_path, train_batch_size=2, num_inner_epochs=2)
    rollout = trainer.rollout(0)
    requested = []
    get = trainer.family.prompt_cache.get

    def spy(prompts, device):
        requested.append(list(prompts))
        return get(prompts, device)

    trainer.family.prompt_cache.get = spy
    trainer.optimise(rollout, Signal(torch.ones(len(rollout.indices))), 0)
    micro_batches = [rollout.prompts[i : i + 2] for i in range(0, len(rollout.prompts), 2)]
    assert trainer.training_guidance_scale > 1
    expected = [rows for batch in micro_batches for rows in (batch, [trainer.cfg.negative_prompt] * 2)]
    assert len(micro_batches) == 4 and requested == 2 * expected


def test_bf16_base_keeps_fp32_lora_and_trains(tiny_sd3_path, tmp_path, fresh_accelerate_state):
    trainer = _trainer(tiny_sd3_path, tmp_path, mixed_precision="bf16")
    model = trainer.unwrapped
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    assert {p.dtype for p in lora.lora_parameters(model, None)} == {torch.float32}
    before = _lora_tensors(model, lora.TRAINED)
    metrics = trainer.run_round(0)
    assert all(map(lambda v: v == v and abs(v) < 1e6, (metrics["loss"], metrics["w2_loss"], metrics["grad_norm"])))
    assert any(not torch.equal(a, b) for a, b in zip(before, _lora_tensors(model, lora.TRAINED)))


def test_gradient_checkpointing_gives_the_same_update(tiny_sd3_path, tmp_path, fresh_accelerate_state):
    plain = _trainer(tiny_sd3_path, tmp_path / "a")
    plain.run_round(0)
    expected = _lora_tensors(plain.unwrapped, lora.TRAINED)
    checkpointed = _trainer(tiny_sd3_path, tmp_path / "b", gradient_checkpointing=True)
    assert checkpointed.unwrapped.is_gradient_checkpointing
    checkpointed.run_round(0)
    for a, b in zip(expected, _lora_tensors(checkpointed.unwrapped, lora.TRAINED)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sd3_checkpoint_with_t5_loads_with_or_without_it(tmp_path):
    """SD3/SD3.5 ship T5; load_t5: false drops it (its context part is then zeros, as in diffusers)."""
    from conftest import TINY_WORDS
    from orw_diffusers import tiny
    from orw_diffusers.models import LoadOptions, load_family
    from tiny_flux import t5_encoder, t5_tokenizer

    pipe = tiny.sd3_pipeline(words=TINY_WORDS)
    tok3 = t5_tokenizer(TINY_WORDS)
    pipe.register_modules(text_encoder_3=t5_encoder(len(tok3), d_model=32), tokenizer_3=tok3)
    path = str(tmp_path / "with-t5")
    pipe.save_pretrained(path)
    prompts = ["a red cat", "a blue dog"]
    with_t5 = load_family(LoadOptions(path, max_sequence_length=8), torch.float32)
    assert len(with_t5.text_encoders()) == 3
    cond = with_t5.encode_prompts(prompts, torch.device("cpu")).tensors["prompt_embeds"]  # [2, 16 + 8, 32]
    assert cond.shape == (2, 16 + 8, 32) and cond[:, 16:].abs().sum() > 0
    without = load_family(LoadOptions(path, load_t5=False, max_sequence_length=8), torch.float32)
    assert len(without.text_encoders()) == 2
    cond = without.encode_prompts(prompts, torch.device("cpu")).tensors["prompt_embeds"]
    assert cond.shape == (2, 16 + 8, 32) and cond[:, 16:].abs().sum() == 0
