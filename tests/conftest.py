"""Shared fixtures: a tiny SD3 pipeline built in code, saved, and loaded back like any checkpoint."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from orw_diffusers import tiny

torch.set_num_threads(1)  # 2 shared cores: avoid oversubscription stalls
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "train_scripts", "train_orw_cfm_w2.py")
TEST_REWARDS = os.path.join(REPO, "tests", "rewards_for_tests.py")
TINY_WORDS = tiny.WORDS


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-sd3") / "pipeline")
    tiny.sd3_pipeline(words=TINY_WORDS, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pretrained_tiny_sd3_path(tmp_path_factory) -> str:
    """The tiny pipeline after 300 steps of plain flow matching on latents ``b * P + noise``, where P is
    +1 on the left half and -1 on the right and b ~ U(-1, 1): half its samples are bright on the left.

    A random transformer is not a fixed point of self-training (its own samples pull it elsewhere);
    a flow-matched one nearly is, so a reward's pull can be told apart from drift.
    """
    torch.manual_seed(0)
    pipe = tiny.sd3_pipeline(words=TINY_WORDS, seed=0)
    transformer = pipe.transformer
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            ["a red cat", "a blue dog", ""], None, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=8,
        )  # fmt: skip
    pattern = torch.ones(4, 8, 8)
    pattern[..., 4:] = -1
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = torch.rand(32, 1, 1, 1, generator=g) * 2 - 1
        x1 = b * pattern + 0.1 * torch.randn(32, 4, 8, 8, generator=g)
        noise = torch.randn(32, 4, 8, 8, generator=g)
        sigmas = torch.rand(32, 1, 1, 1, generator=g)
        which = torch.randint(0, 3, (32,), generator=g)
        v = transformer(
            hidden_states=(1 - sigmas) * x1 + sigmas * noise, timestep=sigmas.flatten() * 1000,
            encoder_hidden_states=embeds[which], pooled_projections=pooled[which], return_dict=False,
        )[0]  # fmt: skip
        loss = ((v - (noise - x1)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = str(tmp_path_factory.mktemp("tiny-sd3-pretrained") / "pipeline")
    pipe.save_pretrained(path)
    return path


def tiny_run_config(model_path: str, output_dir: str, **overrides) -> dict:
    """A run config small enough for a CPU test: 2 prompts x 4 images at 16 px, 4 Euler steps."""
    values = dict(
        pretrained_model_name_or_path=model_path,
        output_dir=output_dir,
        max_sequence_length=8,
        resolution=16,
        prompts=["a red cat", "a blue dog"],
        images_per_prompt=4,
        sample_batch_size=4,
        train_batch_size=4,
        num_epochs=2,
        num_sampling_steps=4,
        guidance_scale=2.0,
        rank=4,
        learning_rate=1e-3,
        temperature=1.0,
        w2_coefficient=0.1,
        reward=f"{TEST_REWARDS}:brightness",
        seed=0,
    )
    values.update(overrides)
    return values


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton fixed at the first Accelerator's mixed_precision:
    start this test from scratch and leave none behind for the next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def for_objective(values: dict, objective: str, **extra) -> dict:
    """``values`` (a run config dict) for ``objective``: the keys of the other objectives dropped (from ``values``
    and ``extra``), then ``extra``'s keys set; e.g. ``sde_window_size=2`` applies to flow_grpo only."""
    from orw_diffusers.objectives import OBJECTIVES

    own = set(OBJECTIVES[objective].config_keys)
    others = {k for c in OBJECTIVES.values() for k in c.config_keys} - own
    keep = lambda d: {k: v for k, v in d.items() if k not in others}  # noqa: E731
    return {**keep(values), "objective": objective, **keep(extra)}


def first_micro_batch(trainer, round_idx: int = 0):
    """(the round's rollout, its first training micro-batch, that micro-batch's fields), as ``Trainer.optimise`` makes them."""
    from orw_diffusers.objectives.base import MicroBatch, slice_extras

    rollout = trainer.rollout(round_idx)
    global_rewards = trainer.gather_global(rollout.rewards, rollout.indices)
    groups = torch.tensor([trainer.prompt_ids[p] for p in trainer.sample_prompts(round_idx)])
    signal = trainer.objective.signal(global_rewards, groups).values[rollout.indices]
    bs = trainer.cfg.train_batch_size
    rows = torch.arange(bs)
    batch = MicroBatch(round_idx, 0, trainer.cfg.seed, rollout.indices[rows], rollout.latents[rows], signal[rows],
                       slice_extras(rollout.extras, rows))  # fmt: skip
    return rollout, batch, trainer.training_fields(rollout.prompts[:bs])


def left_bright_gain(values: dict) -> tuple[float, list[float]]:
    """Train the run config ``values`` with the ``left_bright`` reward (about +-6 on the flow-matched tiny pipeline):
    (the mean reward of the last 4 rounds minus round 0's, which samples the base; every round's mean reward)."""
    from orw_diffusers.config import TrainConfig
    from orw_diffusers.trainer import Trainer
    from rewards_for_tests import left_bright

    cfg = TrainConfig(**values)
    trainer = Trainer(cfg, reward_fn=left_bright)
    rewards = [trainer.run_round(r)["reward_mean"] for r in range(cfg.num_epochs)]
    return sum(rewards[-4:]) / 4 - rewards[0], rewards


def lora_changes_a_plain_sd3_pipeline(model_path: str, lora_dir: str) -> bool:
    """Whether ``pipe.load_lora_weights(lora_dir)`` on a plain ``StableDiffusion3Pipeline`` changes its images."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_path, text_encoder_3=None, tokenizer_3=None)
    kwargs = dict(prompt="a red cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                  max_sequence_length=8)  # fmt: skip
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora_dir)
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    return bool((after - before).abs().max() > 0)


# --- helpers of the family tests (test_sd3.py, test_family_contract.py) --------------------------
def tiny_trainer(model_path: str, tmp_path, **overrides):
    """A trainer on ``tiny_run_config(model_path, tmp_path / "out", **overrides)`` with the ``darkness`` reward."""
    from orw_diffusers.config import TrainConfig
    from orw_diffusers.trainer import Trainer
    from rewards_for_tests import darkness

    cfg = TrainConfig(**tiny_run_config(model_path, str(tmp_path / "out"), **overrides))
    return Trainer(cfg, reward_fn=darkness)


def velocity_probe(trainer, n: int = 3):
    """(x, sigmas, cond): random latents of the family's shape, sigmas in (0, 1), cached prompts."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn((n, *trainer.latent_shape), generator=g)
    sigmas = torch.rand(n, generator=g)
    cond = trainer.family.prompt_cache.get(["a red cat", "a blue dog", ""][:n], trainer.device)
    return x, sigmas, cond


def velocity(trainer, model: torch.nn.Module, probe) -> torch.Tensor:
    """The family's velocity of ``model`` at a ``velocity_probe``, without grad."""
    with torch.no_grad():
        return trainer.family.predict_velocity(model, *probe)


def sampled_and_pipeline_call(trainer, prompts=("a red cat", "a blue dog"), round_idx: int = 5):
    """(our sampler's decoded images of ``prompts`` in round ``round_idx``, the kwargs of a plain diffusers
    pipeline call from the same initial noise with the same steps and ``guidance_scale``)."""
    from orw_diffusers import streams
    from orw_diffusers.flow import per_sample_noise

    prompts, indices = list(prompts), torch.arange(len(prompts))
    with torch.no_grad():
        ours = trainer.family.decode(trainer.rollouts.record(prompts, indices, round_idx=round_idx).latents)
    noise = per_sample_noise(trainer.latent_shape, trainer.cfg.seed, (round_idx, streams.SAMPLING_NOISE), indices)
    kwargs = dict(
        prompt=prompts, latents=noise, num_inference_steps=trainer.cfg.num_sampling_steps,
        guidance_scale=trainer.cfg.guidance_scale, height=16, width=16, output_type="pt", max_sequence_length=8,
    )  # fmt: skip
    return ours, kwargs


def python() -> str:
    return sys.executable
