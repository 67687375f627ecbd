"""``lora.reference`` on a tiny SD3 transformer: the base model's output, and the same ``requires_grad``
flags as diffusers' ``disable_adapters`` / ``enable_adapters``, from the cached list of peft layers."""

from __future__ import annotations

import pytest
import torch

from orw_diffusers import lora, tiny
from orw_diffusers.models.sd3 import JOINT_ATTENTION_TARGETS


def _transformer(with_adapters: bool = True) -> torch.nn.Module:
    model = tiny.sd3_transformer(seed=0).eval()
    if with_adapters:
        lora.add_adapters(model, rank=4, lora_alpha=None, target_modules=list(JOINT_ATTENTION_TARGETS))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero B: both adapters change the output, and differ from each other
            for p in lora.lora_parameters(model, None):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _velocity(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 4, 8, 8, generator=g),
            timestep=torch.tensor([250.0, 750.0]),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
            pooled_projections=torch.randn(2, 32, generator=g),
            return_dict=False,
        )[0]


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_reference_is_the_base_model():
    model, base = _transformer(), _transformer(with_adapters=False)
    v_policy = _velocity(model)
    with lora.reference(model):
        v_ref = _velocity(model)
    assert not torch.allclose(v_policy, v_ref)  # the adapter really changes the output
    assert torch.equal(v_ref, _velocity(base))  # adapters off: exactly the model without adapters
    assert torch.equal(_velocity(model), v_policy)  # and on again after the block


def test_reference_restores_requires_grad_exactly():
    model = _transformer()
    before = _flags(model)
    assert all(p.requires_grad for p in lora.lora_parameters(model, lora.TRAINED))
    assert not any(p.requires_grad for p in lora.lora_parameters(model, lora.SAMPLER))
    with lora.reference(model):
        assert not any(p.requires_grad for p in lora.lora_parameters(model, None))
        assert all(layer.disable_adapters for layer in lora.tuner_layers(model))
        assert not torch.is_grad_enabled()
    assert _flags(model) == before  # trained adapter trainable again, sampler still frozen, base frozen
    assert not any(layer.disable_adapters for layer in lora.tuner_layers(model))


@pytest.mark.parametrize("inside_sampler", [False, True], ids=["trained-active", "sampler-active"])
def test_reference_matches_diffusers_disable_enable(inside_sampler):
    """Flags and outputs after ``lora.reference`` equal those after diffusers' own walk over every module."""
    ours, theirs = _transformer(), _transformer()

    def run(model, use_diffusers):
        if inside_sampler:
            model.set_adapter(lora.SAMPLER)
        if use_diffusers:
            model.disable_adapters()
            inside = _flags(model)
            model.enable_adapters()
        else:
            with lora.reference(model):
                inside = _flags(model)
        return inside, _flags(model), _velocity(model)

    for got, want in zip(run(ours, False), run(theirs, True)):
        assert torch.equal(got, want) if isinstance(got, torch.Tensor) else got == want


def test_reference_re_enables_after_an_exception():
    model = _transformer()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="inside"), lora.reference(model):
        raise RuntimeError("inside")
    assert _flags(model) == before
    assert not any(layer.disable_adapters for layer in lora.tuner_layers(model))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # a third adapter, on purpose
def test_tuner_layers_are_cached_per_model_and_refreshed_when_adapters_change():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _transformer()
    layers = lora.tuner_layers(model)
    assert layers is lora.tuner_layers(model)  # no second walk over the modules
    assert layers == [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    model.add_adapter(LoraConfig(r=2, target_modules=["ff.net.2"]), adapter_name="extra")
    refreshed = lora.tuner_layers(model)
    assert refreshed is not layers and len(refreshed) == len(layers) + 2  # + the 2 blocks' ff.net.2
    assert refreshed == [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert lora.tuner_layers(_transformer()) is not refreshed  # one cache entry per model


def test_reference_without_adapters_is_an_error():
    model = _transformer(with_adapters=False)
    with pytest.raises(ValueError, match="No adapter loaded"), lora.reference(model):
        pass


def test_the_lora_file_name_is_diffusers_own():
    """The pipeline's save_lora_weights writes diffusers' default name, and the run reads LORA_WEIGHTS_NAME back."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    from orw_diffusers.weight_files import LORA_WEIGHTS_NAME

    assert LORA_WEIGHTS_NAME == LORA_WEIGHT_NAME_SAFE
