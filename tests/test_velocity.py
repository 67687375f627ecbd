"""Plain velocity models (torchcfm's convention) behind the model seam, both policies, and the original
ORW-CFM-W2 API (``orw_diffusers.cfm.ORWCFMTrainer``). Tiny models, a few rounds: seconds."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch

from orw_diffusers.cfm import ORWCFMTrainer
from orw_diffusers.digits.pixel import PixelVelocityMLP
from orw_diffusers.errors import ConfigError
from orw_diffusers.flow import interpolate, target_velocity
from orw_diffusers.models.velocity import VelocityModel, read_velocity_checkpoint, torchcfm_time
from orw_diffusers.sampling import guided_field, integrate

HAS_TORCHCFM = importlib.util.find_spec("torchcfm") is not None and importlib.util.find_spec("ot") is not None
needs_torchcfm = pytest.mark.skipif(not HAS_TORCHCFM, reason="torchcfm (with pot) is not installed")
HERE = os.path.dirname(os.path.abspath(__file__))


class TowardsPoint(torch.nn.Module):
    """torchcfm convention: v(t, x) = (c - x) / (1 - t), linear in x: the straight path from any x(0) to
    x(1) = c, along which the velocity is constant, so Euler steps land on it exactly."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = torch.nn.Parameter(c)
        self.in_channels, self.image_size = c.shape[0], c.shape[-1]

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.c - x) / (1 - t).view(-1, 1, 1, 1)


def tiny_mlp(seed: int = 0, **kwargs) -> PixelVelocityMLP:
    torch.manual_seed(seed)
    return PixelVelocityMLP(width=16, depth=2, time_dim=8, **kwargs)


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean((1, 2, 3))


def cfm_config(tmp_path, **overrides) -> dict:
    values = dict(learning_rate=1e-3, warmup_steps=0, w2_coefficient=1.0, temperature=0.5, grad_clip=1.0,
                  batch_size=4, savedir=str(tmp_path / "results"), num_sampling_steps=3, report_to="none",
                  sample_log_interval=0)  # fmt: skip
    values.update(overrides)
    return values


# --- the convention mapping -----------------------------------------------------------------------
def test_linear_field_integrates_to_its_endpoint_in_both_conventions():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 4, 4, generator=g)
    module, x0 = TowardsPoint(c), torch.randn(2, 1, 4, 4, generator=g)
    expected = c.expand(2, 1, 4, 4)
    # torchcfm's side: Euler in t from 0 (noise) to 1 (data)
    x, ts = x0.clone(), torch.linspace(0, 1, 5)
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * module(t.expand(2), x)
    torch.testing.assert_close(x, expected)
    # ours: sigma from 1 (noise) to 0 (data) through the family's velocity, Euler and Heun
    family = VelocityModel(module)
    field = guided_field(family, module, None, None, 1.0)
    sigmas = family.sampling_sigmas(4, family.sample_shape)
    torch.testing.assert_close(sigmas, 1 - ts)
    for solver in ("euler", "heun"):
        torch.testing.assert_close(integrate(field, x0, sigmas, solver=solver), expected)
    # The same integration with the sign flipped: each Euler step multiplies x - c by 1 + |dt| / sigma, so it lands
    # at c + (5/4)(4/3)(3/2)(2)(x0 - c) = c + 5 (x0 - c), far from c: the check above tells the signs apart.
    wrong = integrate(lambda x, s: -field(x, s), x0, sigmas)
    torch.testing.assert_close(wrong, expected + 5 * (x0 - expected))
    assert (wrong - expected).abs().min() > 0.01


def test_velocity_is_minus_torchcfm_at_one_minus_sigma_and_paths_agree():
    module = tiny_mlp()
    family = VelocityModel(module)
    g = torch.Generator().manual_seed(1)
    x1, x0, sigmas = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(family.predict_velocity(module, x1, sigmas, None), -module(1 - sigmas, x1))
    t = torchcfm_time(sigmas).view(-1, 1, 1, 1)
    torch.testing.assert_close(interpolate(x1, x0, sigmas), t * x1 + (1 - t) * x0)  # torchcfm's x_t
    torch.testing.assert_close(target_velocity(x1, x0), -(x1 - x0))  # torchcfm's u_t, negated


@needs_torchcfm
def test_paths_match_torchcfm_flow_matcher():
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    g = torch.Generator().manual_seed(2)
    x0, x1, t = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g)
    _, xt, ut = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(x0, x1, t=t)
    torch.testing.assert_close(interpolate(x1, x0, 1 - t), xt)
    torch.testing.assert_close(target_velocity(x1, x0), -ut)


def test_decode_maps_data_range_and_repeats_grey():
    family = VelocityModel(tiny_mlp(), data_range=(-1, 1))
    images = family.decode(torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8))
    assert images.shape == (4, 3, 8, 8)
    assert images[:, :, 0, 0].tolist() == [[0.0] * 3, [0.5] * 3, [1.0] * 3, [1.0] * 3]
    assert VelocityModel(tiny_mlp(), data_range=(0, 255)).decode(torch.full((1, 1, 8, 8), 51.0)).max().item() == pytest.approx(0.2)


# --- the policies ----------------------------------------------------------------------------------
def _trainer(tmp_path, policy: str, module: torch.nn.Module, **overrides):
    from orw_diffusers.config import TrainConfig
    from orw_diffusers.trainer import Trainer

    values = dict(model_factory=None, output_dir=str(tmp_path / policy), prompts=[""], images_per_prompt=4,
                  sample_batch_size=4, train_batch_size=4, num_epochs=1, num_sampling_steps=3, guidance_scale=1.0,
                  learning_rate=1e-2, w2_coefficient=1.0, rank=4, policy=policy, report_to="none",
                  sample_log_interval=0, seed=0)  # fmt: skip
    values.update(overrides)
    family = VelocityModel(module, clip_samples=values["clip_samples"]) if "clip_samples" in values else VelocityModel(module)
    return Trainer(TrainConfig(**values), reward_fn=lambda im, p: brightness(im), model=family)


class Outwards(torch.nn.Module):
    """A field that carries every sample far outside the data range [-1, 1]: v = 5 (torchcfm's convention)."""

    in_channels, image_size = 1, 8

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.ones_like(x)


@pytest.mark.parametrize("clip", [False, True])
def test_clip_samples_keeps_what_is_trained_on_inside_the_data_range(tmp_path, clip):
    trainer = _trainer(tmp_path, "full", Outwards(), clip_samples=clip)
    rollout = trainer.rollouts.collect([""] * 4, torch.arange(4), round_idx=0)
    if clip:
        assert rollout.latents.min() >= -1 and rollout.latents.max() <= 1
    else:
        assert rollout.latents.max() > 3  # the paper's code trains on the raw sample
    torch.testing.assert_close(rollout.images, trainer.family.decode(rollout.latents))  # scored = trained on


def test_clip_samples_is_refused_on_a_pipeline(tiny_sd3_path):
    from conftest import tiny_run_config

    from orw_diffusers.config import TrainConfig, validate

    with pytest.raises(ConfigError, match="clip_samples: only used with model_factory"):
        validate(TrainConfig(**tiny_run_config(tiny_sd3_path, "/tmp/unused", clip_samples=True)))


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_reference_stays_the_base_and_sampler_follows_refresh(tmp_path, policy):
    base = tiny_mlp()
    trainer = _trainer(tmp_path, policy, copy.deepcopy(base), sampler_update_interval=2)
    x, sigmas = torch.randn(3, 1, 8, 8), torch.rand(3)

    def v(context=None):
        net = trainer.unwrapped
        with (context(net) if context else torch.no_grad()) as used:
            return trainer.family.predict_velocity(used if context else net, x, sigmas, None)

    with torch.no_grad():
        v_base = -base(1 - sigmas, x)
    for velocity in (v(), v(trainer.policy.reference), v(trainer.policy.sampler)):
        torch.testing.assert_close(velocity, v_base)  # before training all three are the base: W2 = 0
    trainer.run_round(0)  # one optimizer step, no refresh yet (interval 2)
    assert not torch.allclose(v(), v_base)
    torch.testing.assert_close(v(trainer.policy.reference), v_base)
    torch.testing.assert_close(v(trainer.policy.sampler), v_base)
    trainer.run_round(1)  # the refresh
    torch.testing.assert_close(v(trainer.policy.sampler), v())
    torch.testing.assert_close(v(trainer.policy.reference), v_base)
    # the exported weights, loaded into a plain copy of the base, give the trained velocity
    plain = copy.deepcopy(base)
    plain.load_state_dict(trainer.policy.export_weights(trainer.unwrapped))
    with torch.no_grad():
        torch.testing.assert_close(-plain(1 - sigmas, x), v(), atol=1e-6, rtol=1e-5)


class TinyConvVelocity(torch.nn.Module):
    """A conv velocity model in torchcfm's convention (Conv2d layers and a Linear time embedding)."""

    in_channels, image_size = 1, 8

    def __init__(self):
        super().__init__()
        self.time = torch.nn.Linear(1, 4)
        self.conv_in = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.time(t.view(-1, 1))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


def test_lora_goes_on_linear_and_conv_layers_and_trains_only_the_adapter(tmp_path):
    from orw_diffusers import lora

    torch.manual_seed(0)
    module = TinyConvVelocity()
    base = copy.deepcopy(module)
    trainer = _trainer(tmp_path, "lora", module)
    adapted = {n.split(".lora_A.")[0] for n, _ in trainer.unwrapped.named_parameters() if ".lora_A." in n}
    assert adapted == {"time", "conv_in", "conv_out"}
    assert all(p.requires_grad for p in trainer.params) and not any(
        p.requires_grad for n, p in trainer.unwrapped.named_parameters() if "base_layer" in n)  # fmt: skip
    assert len(lora.lora_parameters(trainer.unwrapped, lora.SAMPLER)) == len(trainer.params)
    trainer.train()
    merged = copy.deepcopy(base)
    merged.load_state_dict(trainer.policy.export_weights(trainer.unwrapped))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(merged(t, x), trainer.unwrapped(t, x))
        assert not torch.allclose(merged(t, x), base(t, x))
    # the saved adapter (one safetensors file) put back on a fresh base gives the same model
    from orw_diffusers.models.velocity import load_lora_adapter

    reloaded = load_lora_adapter(copy.deepcopy(base), os.path.join(trainer.cfg.output_dir, "lora_adapter.safetensors"))
    assert isinstance(reloaded.conv_in, torch.nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(t, x), merged(t, x))


def test_full_policy_trains_every_weight_and_checkpoints_resume(tmp_path):
    from orw_diffusers import checkpoint

    trainer = _trainer(tmp_path, "full", tiny_mlp(), num_epochs=2, checkpointing_steps=1)
    assert len(trainer.params) == len(list(trainer.unwrapped.parameters()))
    trainer.train()
    saved = checkpoint.latest_checkpoint(trainer.cfg.output_dir)
    assert os.path.isfile(os.path.join(saved, "model.safetensors"))
    assert os.path.isfile(os.path.join(saved, "sampler", "model.safetensors"))
    resumed = _trainer(tmp_path, "full", tiny_mlp(), num_epochs=2, checkpointing_steps=1, resume_from_checkpoint=saved)
    assert resumed.rounds_done == 2
    for a, b in zip(resumed.unwrapped.parameters(), trainer.unwrapped.parameters()):
        torch.testing.assert_close(a, b)


# --- load_pretrained -------------------------------------------------------------------------------
def test_load_pretrained_takes_ema_model_and_never_the_optimizer(tmp_path, caplog):
    net, ema = tiny_mlp(seed=1), tiny_mlp(seed=2)
    optim = torch.optim.Adam(net.parameters(), lr=0.123)
    net(torch.rand(2), torch.randn(2, 1, 8, 8)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: 1.0)
    path = str(tmp_path / "cifar10_weights_step_400000.pt")
    torch.save({"net_model": net.state_dict(), "ema_model": ema.state_dict(), "optim": optim.state_dict(),
                "sched": sched.state_dict(), "step": 400000}, path)  # fmt: skip
    model = tiny_mlp(seed=3)
    trainer = ORWCFMTrainer(model, cfm_config(tmp_path, warmup_steps=10), "cpu", reward_fn=brightness)
    with caplog.at_level("INFO", logger="orw_diffusers.cfm"):
        note = trainer.load_pretrained(path)
    assert "'ema_model'" in note and "not restored" in note and note in caplog.text
    for a, b in zip(model.parameters(), ema.parameters()):
        torch.testing.assert_close(a, b)
    trainer.train(num_epochs=1, steps_per_epoch=1)
    # a fresh optimizer with its own warmup: step 1 of 10 at lr 1e-3, not the pretraining lr 0.123
    assert trainer.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 1 / 10)
    assert all(s["step"].item() == 1 for s in trainer.trainer.optimizer.state_dict()["state"].values())
    ORWCFMTrainer(model, cfm_config(tmp_path), "cpu", reward_fn=brightness).load_pretrained(path, key="net_model")
    for a, b in zip(model.parameters(), net.parameters()):
        torch.testing.assert_close(a, b)


def test_checkpoint_reader_bare_state_dict_ddp_prefix_and_unsafe_pickle(tmp_path):
    mlp = tiny_mlp()
    bare, ddp, unsafe = (str(tmp_path / f"{n}.pt") for n in ("bare", "ddp", "unsafe"))
    torch.save(mlp.state_dict(), bare)
    torch.save({"net_model": {f"module.{k}": v for k, v in mlp.state_dict().items()}}, ddp)
    torch.save({"net_model": mlp.state_dict(), "extra": PixelVelocityMLP}, unsafe)  # a class: weights_only refuses it
    assert read_velocity_checkpoint(bare)[1] == "the bare state dict"
    state, which = read_velocity_checkpoint(ddp)
    assert which == "'net_model'" and set(state) == set(mlp.state_dict())
    with pytest.raises(ConfigError, match="weights_only=True"):
        read_velocity_checkpoint(unsafe)


# --- the original API ------------------------------------------------------------------------------
def test_save_checkpoint_writes_the_original_keys_and_loads_weights_only(tmp_path):
    model = tiny_mlp()
    trainer = ORWCFMTrainer(model, cfm_config(tmp_path), "cpu", reward_fn=brightness)
    trainer.train(num_epochs=2, steps_per_epoch=2)
    path = str(tmp_path / "checkpoints" / "orw_cfm_w2.pt")
    trainer.save_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    assert set(ck) == {"net_model", "last_policy", "optim", "sched", "config"}
    assert ck["sched"]["last_epoch"] == 4 and ck["config"]["batch_size"] == 4
    assert set(ck["net_model"]) == set(model.state_dict())
    for key, value in model.state_dict().items():  # trained in place: the user's model is the net
        torch.testing.assert_close(ck["net_model"][key], value)
        torch.testing.assert_close(ck["last_policy"][key], value)  # refreshed at the end of each epoch
    metrics = trainer.train(num_epochs=1, steps_per_epoch=1)  # a second call continues the run
    assert metrics["epoch"] == 4 and trainer.trainer.rounds_done == 5


def test_run_config_maps_the_original_keys(tmp_path):
    from orw_diffusers.cfm import run_config

    original = {"learning_rate": 2e-4, "warmup_steps": 5000, "w2_coefficient": 1.0, "temperature": 0.5,
                "grad_clip": 1.0, "batch_size": 128, "text_prompts": ["An image of dog", "Not an image of dog"],
                "use_wandb": True, "wandb_project": "flow-matching", "run_name": "orw-cfm-w2", "savedir": "./results",
                "ref_path": "./pretrained/model.pt"}  # fmt: skip
    values = run_config(original, reward_given=False, num_rounds=1000 * 100, steps_per_epoch=100)
    assert values["lr_warmup_steps"] == 5000 and values["max_grad_norm"] == 1.0 and values["output_dir"] == "./results"
    assert values["report_to"] == "wandb" and values["tracker_project"] == "flow-matching"
    assert values["tracker_run_name"] == "orw-cfm-w2" and values["weight_normalization"] == "none"
    assert (values["num_epochs"], values["sampler_update_interval"], values["images_per_prompt"]) == (100000, 100, 128)
    assert values["train_batch_size"] == 128 and values["adam_weight_decay"] == 0.0
    assert values["reward"] == [{"name": "clip_zero_shot",
                                 "kwargs": {"positive": ["An image of dog"], "negative": ["Not an image of dog"]}}]


@needs_torchcfm
def test_the_readme_example_on_a_tiny_unet(tmp_path, monkeypatch):
    """The original README's example with its import line changed (and tiny sizes); CLIP is replaced by a
    stand-in registered under clip_zero_shot, which gets the text prompts as the real one would."""
    from torchcfm.models.unet.unet import UNetModelWrapper

    from orw_diffusers import rewards

    seen = {}

    def fake_clip_zero_shot(device="cpu", dtype=None, batch_size=32, positive=(), negative=()):
        seen.update(positive=list(positive), negative=list(negative))
        return lambda images, prompts: images.mean((1, 2, 3))

    monkeypatch.setitem(rewards.REWARDS, "clip_zero_shot", fake_clip_zero_shot)
    torch.manual_seed(0)
    pretrained = UNetModelWrapper(dim=(3, 8, 8), num_res_blocks=1, num_channels=32, channel_mult=[1, 2],
                                  num_heads=1, num_head_channels=-1, attention_resolutions="4", dropout=0.1)
    for p in pretrained.parameters():
        p.data.normal_(0, 0.02)  # torchcfm zero-initialises its output layers: a "pretrained" net that moves
    os.makedirs(tmp_path / "pretrained")
    torch.save({"net_model": pretrained.state_dict(), "ema_model": pretrained.state_dict(), "optim": {}, "sched": {},
                "step": 1}, tmp_path / "pretrained" / "model.pt")  # fmt: skip
    monkeypatch.chdir(tmp_path)

    config = {
        'learning_rate': 2e-4,
        'warmup_steps': 5000,
        'w2_coefficient': 1.0,  # alpha
        'temperature': 0.5,     # tau
        'grad_clip': 1.0,
        'batch_size': 4,
        'text_prompts': ["An image of dog", "Not an image of dog"],
        'use_wandb': False,
        'wandb_project': 'flow-matching',
        'run_name': 'orw-cfm-w2',
        'savedir': './results',
        'ref_path': './pretrained/model.pt',
        'num_sampling_steps': 2,
    }  # fmt: skip
    model = UNetModelWrapper(dim=(3, 8, 8), num_res_blocks=1, num_channels=32, channel_mult=[1, 2],
                             num_heads=1, num_head_channels=-1, attention_resolutions="4", dropout=0.1)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    trainer = ORWCFMTrainer(model, config, device)
    trainer.load_pretrained(config['ref_path'])
    trainer.train(num_epochs=2, steps_per_epoch=2)
    trainer.save_checkpoint('./checkpoints/orw_cfm_w2.pt')

    assert seen == {"positive": ["An image of dog"], "negative": ["Not an image of dog"]}
    assert trainer.trainer.latent_shape == (3, 8, 8)  # read from the UNet's in_channels and image_size
    ck = torch.load(tmp_path / "checkpoints" / "orw_cfm_w2.pt", weights_only=True)
    fresh = UNetModelWrapper(dim=(3, 8, 8), num_res_blocks=1, num_channels=32, channel_mult=[1, 2],
                             num_heads=1, num_head_channels=-1, attention_resolutions="4", dropout=0.1)
    fresh.load_state_dict(ck["net_model"])  # the original's keys load into a plain UNet
    assert os.path.isfile(tmp_path / "results" / "model.safetensors")
    assert os.path.isfile(tmp_path / "results" / "metrics.jsonl")
    card = (tmp_path / "results" / "README.md").read_text()  # names the module passed in, not a pipeline
    assert "torchcfm.models.unet.unet.UNetModelWrapper" in card and "stable-diffusion" not in card


# --- bad inputs --------------------------------------------------------------------------------------
class WrongShape(torch.nn.Module):
    in_channels, image_size = 1, 8

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def forward(self, t, x):
        return self.lin(x.flatten(1))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "config, reward, match",
    [
        ({"w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 4}, brightness, "missing key 'learning_rate'"),
        ({"learning_rate": 1e-3, "w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 4}, None, "text_prompts"),
        ({"learning_rate": 1e-3, "w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 4, "temprature": 1},
         brightness, "did you mean 'temperature'"),
        ({"learning_rate": 1e-3, "w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 0}, brightness, "batch_size"),
        ({"learning_rate": 1e-3, "w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 4,
          "text_prompts": ["only one"]}, None, "two prompts"),
        ({"learning_rate": 1e-3, "w2_coefficient": 1.0, "temperature": 0.5, "batch_size": 4, "grad_clip": 1,
          "max_grad_norm": 2}, brightness, "same setting"),
    ],
)  # fmt: skip
def test_bad_config_is_a_one_line_error(config, reward, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        ORWCFMTrainer(tiny_mlp(), config, "cpu", reward_fn=reward)
    _one_line(excinfo)


@pytest.mark.parametrize("objective, metric", [("flow_grpo", "velocity_gap"), ("diffusion_nft", "kl")])
def test_another_objective_runs_through_the_api_without_orw_keys(tmp_path, objective, metric):
    """w2_coefficient and temperature are required only with the original's objective; the API's ORW default
    (weight_normalization: none) is not passed to another one, which would refuse it."""
    from orw_diffusers.hub import read_metrics

    config = {k: v for k, v in cfm_config(tmp_path, objective=objective, kl_beta=0.1).items()
              if k not in ("w2_coefficient", "temperature")}  # fmt: skip
    if objective == "flow_grpo":
        config["sde_window_size"] = 1
    before = copy.deepcopy(tiny_mlp().state_dict())
    trainer = ORWCFMTrainer(tiny_mlp(), config, "cpu", reward_fn=brightness)
    trainer.train(num_epochs=2, steps_per_epoch=1)
    rows = read_metrics(config["savedir"])
    assert len(rows) == 2 and all(metric in r for r in rows)
    assert trainer.trainer.cfg.objective == objective
    after = trainer.checkpoint_dict()["net_model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # every weight is the policy's: trained
    with pytest.raises(ConfigError, match="missing key 'w2_coefficient'"):
        ORWCFMTrainer(tiny_mlp(), {**config, "objective": "orw_cfm_w2"}, "cpu", reward_fn=brightness)


def test_bad_models_and_rewards_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="differs from its input") as excinfo:
        ORWCFMTrainer(WrongShape(), cfm_config(tmp_path), "cpu", reward_fn=brightness).train(1, 1)
    _one_line(excinfo)
    with pytest.raises(ConfigError, match="image_shape: set it") as excinfo:
        ORWCFMTrainer(torch.nn.Linear(2, 2), cfm_config(tmp_path), "cpu", reward_fn=brightness).train(1, 1)
    _one_line(excinfo)
    with pytest.raises(ValueError, match="not finite") as excinfo:
        nan = ORWCFMTrainer(tiny_mlp(), cfm_config(tmp_path), "cpu", reward_fn=lambda im: brightness(im) * float("nan"))
        nan.train(1, 1)
    _one_line(excinfo)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        ORWCFMTrainer(tiny_mlp(), cfm_config(tmp_path), "cpu", reward_fn=brightness).train(1, 0)
    with pytest.raises(ConfigError, match="null_class"):
        ORWCFMTrainer(tiny_mlp(num_classes=3), cfm_config(tmp_path, guidance_scale=2.0, prompts=["1"]), "cpu",
                      reward_fn=brightness).train(1, 1)  # fmt: skip
    with pytest.raises(ConfigError, match="not a class label"):
        ORWCFMTrainer(tiny_mlp(num_classes=3), cfm_config(tmp_path, prompts=["7"]), "cpu", reward_fn=brightness).train(1, 1)


# --- the training script -------------------------------------------------------------------------------
def _script():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train_scripts"))
    import train_orw_cfm_w2

    return train_orw_cfm_w2


def _script_argv(tmp_path, out: str, **overrides) -> list[str]:
    import json

    values = dict(model_factory="orw_diffusers.digits.pixel:pixel_mlp", model_kwargs={"width": 16, "depth": 2},
                  output_dir=str(tmp_path / out), images_per_prompt=4, sample_batch_size=4, train_batch_size=4,
                  num_epochs=2, num_sampling_steps=2, learning_rate=1e-3, reward=f"{HERE}/rewards_for_tests.py:brightness",
                  report_to="none", sample_log_interval=0, rank=4)  # fmt: skip
    values.update(overrides)
    return [arg for k, v in values.items() for arg in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def test_script_trains_a_factory_model_from_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from orw_diffusers.digits.pixel import pixel_mlp

    start = pixel_mlp(width=16, depth=2)
    torch.save({"ema_model": start.state_dict(), "net_model": {}}, tmp_path / "start.pt")
    script = _script()
    assert script.main(_script_argv(tmp_path, "full", model_checkpoint=str(tmp_path / "start.pt"))) == 0
    weights = load_file(tmp_path / "full" / "model.safetensors")
    assert set(weights) == set(start.state_dict())
    assert script.main(_script_argv(tmp_path, "lora", policy="lora")) == 0
    assert os.path.isfile(tmp_path / "lora" / "lora_adapter.safetensors")
    # the model cards describe the velocity model, never the pipeline default of pretrained_model_name_or_path
    for out, snippet in (("full", "model.load_state_dict(load_file("), ("lora", "load_lora_adapter(model, ")):
        card = (tmp_path / out / "README.md").read_text()
        assert "stable-diffusion" not in card and "load_lora_weights" not in card
        assert "orw_diffusers.digits.pixel:pixel_mlp" in card and snippet in card
        assert "pipeline_tag: unconditional-image-generation" in card


def test_a_velocity_run_pushes_its_weights_and_a_card_that_loads_them(tmp_path, capsys):
    from test_hub import FakeApi

    from orw_diffusers import push

    script = _script()
    assert script.main(_script_argv(tmp_path, "full", num_epochs=1)) == 0
    api = FakeApi()
    assert push.main([str(tmp_path / "full"), "--hub_model_id", "me/digits-full"], api=api) == 0
    uploaded = [c for c in api.calls if c[0] == "upload_folder"][0][4]
    assert "model.safetensors" in uploaded and "README.md" in uploaded
    card = (tmp_path / "full" / "README.md").read_text()
    assert 'load_file(hf_hub_download("me/digits-full", "model.safetensors"))' in card
    assert "hf_hub_download('me/digits-full', 'model.safetensors')" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model_factory": "no_colon"}, "model_factory"),
        ({"model_factory": "orw_diffusers.digits.pixel:nothing_here"}, "names no callable"),
        ({"model_checkpoint": "/does/not/exist.pt"}, "model_checkpoint"),
        ({"policy": "half"}, "policy"),
        ({"data_range": [1, -1]}, "data_range"),
    ],
)
def test_script_bad_velocity_keys_exit_2(tmp_path, capsys, overrides, match):
    assert _script().main(_script_argv(tmp_path, "bad", **overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err
