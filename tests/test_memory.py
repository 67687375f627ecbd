"""The memory planner: shipped and local configs without network, the breakdown, monotonic sanity, errors."""

import os
from dataclasses import replace

import pytest
import torch
import yaml

from conftest import REPO, tiny_run_config
from orw_diffusers import memory
from orw_diffusers.errors import ConfigError
from orw_diffusers.config import TrainConfig
from orw_diffusers.memory import MemoryPlanner, PlanSettings, load_model_configs, parse_size

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


@pytest.fixture(scope="module")
def tiny_planner(tiny_sd3_path) -> MemoryPlanner:
    return MemoryPlanner(load_model_configs(tiny_sd3_path))


def _tiny_settings(path: str, **overrides) -> PlanSettings:
    """What the planner reads from the tests' tiny run config (8 samples, batches of 2), with ``overrides``."""
    cfg = TrainConfig(**tiny_run_config(path, "unused-output-dir", train_batch_size=2, sample_batch_size=2))
    return replace(PlanSettings.from_train_config(cfg), **overrides)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("23028MiB") == 23028 * 2**20
    assert parse_size("1.5 gib") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="24GiB"):
        parse_size("24 parsecs")


def test_unknown_model_is_a_one_line_error(capsys):
    with pytest.raises(ConfigError) as err:
        load_model_configs("nobody/no-such-model")
    message = str(err.value)
    assert "\n" not in message and "no-such-model" in message and SD35_MEDIUM in message
    assert memory.main(["--pretrained_model_name_or_path", "nobody/no-such-model", "--prompts_per_round", "4"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: model 'nobody/no-such-model'") and "\n" not in stderr


@pytest.mark.parametrize(
    "hub_id, billions",
    [(SD35_MEDIUM, 2.24), ("stabilityai/stable-diffusion-3.5-large", 8.05), ("black-forest-labs/FLUX.1-dev", 11.90)],
)
def test_shipped_configs_build_the_real_architecture_on_meta(hub_id, billions):
    configs = load_model_configs(hub_id)  # no download: the shipped public configs
    model = memory.meta_diffusers_model(configs.components["transformer"], torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert memory.num_parameters(model) / 1e9 == pytest.approx(billions, abs=0.01)
    assert memory.architecture(configs) is memory.ARCHITECTURES[configs.transformer_class]
    assert configs.text_encoders()  # the encoders the prompt cache runs once


def test_sd35_medium_plan_adds_up_and_fits_an_a10():
    planner = MemoryPlanner(load_model_configs(SD35_MEDIUM))
    s = PlanSettings(
        model=SD35_MEDIUM,
        resolution=512,
        train_batch_size=1,
        sample_batch_size=2,
        samples_per_process=8,
        mixed_precision="fp16",
        gradient_checkpointing=True,
    )
    plan = planner.plan(s)
    assert plan.peak == sum(item.bytes for item in plan.peak_items())
    for phase in memory.PHASES:
        assert plan.phase_total(phase) == sum(i.bytes for i in plan.items if phase in i.phases)
    groups = {item.group for item in plan.items}
    assert {"frozen weights", "LoRA", "activations", "runtime"} <= groups
    # fp16 transformer weights + buffers: 2.24 B params and the 384^2 x 1536 position table
    transformer = next(i for i in plan.items if i.name.startswith("transformer"))
    assert transformer.bytes / 2**30 == pytest.approx(4.6, abs=0.1)
    assert plan.fits(parse_size("23028MiB"))  # an A10
    text = memory.format_plan(plan, parse_size("23028MiB"))
    assert "peak:" in text and "fits in" in text


def test_local_model_directory_and_cli(tiny_sd3_path, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "pretrained_model_name_or_path": tiny_sd3_path,
                "resolution": 16,
                "prompts": ["a red cat", "a blue dog"],
                "images_per_prompt": 4,
                "sample_batch_size": 4,
                "train_batch_size": 4,
                "max_sequence_length": 8,
                "rank": 4,
                "reward": "jpeg_compressibility",
            }
        )
    )
    assert memory.main(["--config", str(run), "--gpu_memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "transformer" in out and "peak:" in out and "fits in 24.00 GiB" in out


def test_breakdown_adds_up_on_the_tiny_model(tiny_planner, tiny_sd3_path):
    plan = tiny_planner.plan(_tiny_settings(tiny_sd3_path))
    assert plan.peak == max(plan.phase_total(p) for p in memory.PHASES)
    assert plan.peak == sum(item.bytes for item in plan.peak_items())
    assert all(item.bytes >= 0 for item in plan.items)


def test_activations_are_linear_in_the_batch(tiny_planner, tiny_sd3_path):
    """The planner traces batches 1 and 2 and extrapolates; a direct trace of batch 3 must agree."""
    s = _tiny_settings(tiny_sd3_path)
    extrapolated = tiny_planner.train_step_peak(s, batch=3)
    direct = MemoryPlanner(tiny_planner.configs)
    direct._linear = lambda key, batch, trace_at: trace_at(batch)  # trace the batch itself
    assert direct.train_step_peak(s, batch=3) == pytest.approx(extrapolated, rel=0.02)


def test_monotonic_sanity(tiny_planner, tiny_sd3_path):
    s = _tiny_settings(tiny_sd3_path)
    base = tiny_planner.plan(s)

    def phase(plan, name):
        return plan.phase_total(name)

    assert phase(tiny_planner.plan(replace(s, train_batch_size=4)), "train") > phase(base, "train")
    assert phase(tiny_planner.plan(replace(s, sample_batch_size=4)), "sample") > phase(base, "sample")
    assert phase(tiny_planner.plan(replace(s, sample_batch_size=4)), "decode") > phase(base, "decode")

    def train_activations(plan):
        return next(i.bytes for i in plan.items if i.name.startswith("training micro-batch"))

    assert train_activations(tiny_planner.plan(replace(s, gradient_checkpointing=True))) < train_activations(base)
    half = tiny_planner.plan(replace(s, mixed_precision="bf16"))
    frozen = [i for i in base.items if i.group == "frozen weights"]
    frozen_half = [i for i in half.items if i.group == "frozen weights"]
    assert sum(i.bytes for i in frozen_half) * 2 == pytest.approx(sum(i.bytes for i in frozen), rel=0.01)
    assert tiny_planner.plan(replace(s, rank=16)).item  # builds another adapter size
    lora_items = lambda p: sum(i.bytes for i in p.items if i.group == "LoRA")  # noqa: E731
    assert lora_items(tiny_planner.plan(replace(s, rank=16))) > lora_items(base)
    no_cache = tiny_planner.plan(replace(s, prompt_cache=False))
    assert phase(no_cache, "train") > phase(base, "train")  # text encoders stay resident


def test_advice_names_a_knob_when_it_does_not_fit(tiny_planner, tiny_sd3_path):
    s = _tiny_settings(tiny_sd3_path, train_batch_size=4, sample_batch_size=4)
    plan = tiny_planner.plan(s, runtime_overhead=0)
    fits = memory.advise(tiny_planner, s, plan.peak, 0)
    assert fits.fits and fits.first_knob is None
    budget = plan.peak - 1
    advice = memory.advise(tiny_planner, s, budget, 0)
    assert not advice.fits and advice.first_knob
    assert advice.steps[-1][1] < plan.peak
    assert "first knob: " in memory.format_plan(plan, budget, advice)


def test_family_files_describe_the_architectures():
    """The planner's shapes come from each family's ``memory_architectures``, not a table of its own."""
    from orw_diffusers.models import FAMILIES, FluxFamily, SD3Family

    described = {name for family in FAMILIES for name in family.memory_architectures}
    assert set(memory.ARCHITECTURES) == described
    assert memory.architecture(load_model_configs(SD35_MEDIUM)).family is SD3Family
    assert memory.architecture(load_model_configs("black-forest-labs/FLUX.1-dev")).family is FluxFamily


def test_every_registered_reward_has_a_size():
    from orw_diffusers.rewards import REWARDS, reward_gpu_memory

    for name in REWARDS:
        reward_gpu_memory(name)  # the registry declares each reward's GPU memory (None: none)


def test_a_reward_registered_with_its_size_is_planned_without_a_second_edit(tiny_planner, tiny_sd3_path, monkeypatch):
    from orw_diffusers import rewards

    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))
    monkeypatch.setattr(rewards, "_GPU_MEMORY", dict(rewards._GPU_MEMORY))
    rewards.register_reward("sized_reward", lambda **kwargs: None, rewards.GPUMemory("sized", "my CNN", 2**20, 2**10))
    s = _tiny_settings(tiny_sd3_path, rewards=("sized_reward",), reward_dtype="float16")
    assert tiny_planner.plan(s).item("reward: my CNN (float16)").bytes == 2**20 * 2
    rewards.register_reward("unsized_reward", lambda **kwargs: None)
    with pytest.raises(ConfigError, match="'unsized_reward'.*--reward_memory unsized_reward="):
        tiny_planner.plan(replace(s, rewards=("unsized_reward",)))


def _unsized_reward_run(tiny_sd3_path, tmp_path, monkeypatch) -> str:
    """A run config whose reward is registered (so the config is valid) but unknown to the planner's table."""
    from orw_diffusers import rewards

    monkeypatch.setitem(rewards.REWARDS, "my_reward", lambda **kwargs: None)
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "pretrained_model_name_or_path": tiny_sd3_path,
                "resolution": 16,
                "prompts": ["a red cat", "a blue dog"],
                "images_per_prompt": 2,
                "sample_batch_size": 2,
                "train_batch_size": 2,
                "max_sequence_length": 8,
                "rank": 4,
                "reward": "my_reward",
            }
        )
    )
    return str(run)


def test_unknown_reward_is_a_one_line_error_not_zero_bytes(tiny_planner, tiny_sd3_path, tmp_path, monkeypatch, capsys):
    s = _tiny_settings(tiny_sd3_path, rewards=("my_reward",))
    with pytest.raises(ConfigError) as err:
        tiny_planner.plan(s)
    message = str(err.value)
    assert "\n" not in message and "'my_reward'" in message and "--reward_memory my_reward=" in message
    # on the CPU it needs no GPU size
    assert tiny_planner.plan(replace(s, reward_on_gpu=False)).peak > 0

    run = _unsized_reward_run(tiny_sd3_path, tmp_path, monkeypatch)
    assert memory.main(["--config", run, "--gpu_memory", "24GiB"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: reward 'my_reward'") and "--reward_memory" in stderr and "\n" not in stderr


def test_reward_memory_flag_sizes_a_reward(tiny_planner, tiny_sd3_path, tmp_path, monkeypatch, capsys):
    assert memory.parse_reward_memory(["my_reward=1.5GiB", "pkg.mod:fn=2MiB"]) == (
        ("my_reward", int(1.5 * 2**30)),
        ("pkg.mod:fn", 2 * 2**20),
    )
    with pytest.raises(ConfigError, match="NAME=SIZE"):
        memory.parse_reward_memory(["1.5GiB"])

    s = _tiny_settings(tiny_sd3_path, rewards=("my_reward",), reward_memory=(("my_reward", 2 * 2**30),))
    plan = tiny_planner.plan(s)
    assert plan.item("reward: my_reward (--reward_memory)").bytes == 2 * 2**30
    without = tiny_planner.plan(replace(s, rewards=("jpeg_compressibility",)))
    assert plan.phase_total("reward") - without.phase_total("reward") == 2 * 2**30
    # 0 declares a reward that uses no GPU memory
    assert tiny_planner.plan(replace(s, reward_memory=(("my_reward", 0),))).peak == without.peak

    run = _unsized_reward_run(tiny_sd3_path, tmp_path, monkeypatch)
    assert memory.main(["--config", run, "--gpu_memory", "24GiB", "--reward_memory", "my_reward=1GiB"]) == 0
    assert "reward: my_reward (--reward_memory)" in capsys.readouterr().out


def test_python_dash_m_runs_the_package():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "orw_diffusers.memory", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--gpu_memory" in out and "--reward_memory NAME=SIZE" in out


def test_guided_training_doubles_the_training_activations(tiny_planner, tiny_sd3_path):
    # cfg_training: guided batches both branches with gradients: the training trace runs 2x the rows
    s = replace(_tiny_settings(tiny_sd3_path), guidance_scale=4.5, guided_training=True)
    guided = tiny_planner.train_step_peak(s, batch=2)
    conditional = tiny_planner.train_step_peak(replace(s, guided_training=False), batch=2)
    unguided = tiny_planner.train_step_peak(replace(s, guidance_scale=1.0), batch=2)
    assert conditional == unguided
    assert guided > conditional
    assert tiny_planner.train_step_peak(replace(s, guided_training=False), batch=4) == pytest.approx(guided, rel=0.2)


def test_flow_grpo_plans_its_trajectories_and_its_reference_pass(tiny_sd3_path, tiny_planner):
    cfg = TrainConfig(**tiny_run_config(tiny_sd3_path, "unused-output-dir", objective="flow_grpo", num_sampling_steps=4,
                                        sde_window_size=2, kl_beta=0.0))  # fmt: skip
    s = replace(PlanSettings.from_train_config(cfg), mixed_precision="bf16")
    # x1 in the weight dtype; the latents before and after each of the 2 SDE steps in float32, whatever the dtype
    assert (s.latents_per_sample, s.fp32_latents_per_sample) == (1, 2 * 2)
    assert not s.reference_pass  # no KL term: no reference forward
    orw = replace(PlanSettings.from_train_config(TrainConfig(**tiny_run_config(tiny_sd3_path, "unused-output-dir"))),
                  mixed_precision="bf16")  # fmt: skip
    assert (orw.latents_per_sample, orw.fp32_latents_per_sample) == (1, 0) and orw.reference_pass
    round_data = lambda settings: next(i.bytes for i in tiny_planner.plan(settings).items if i.group == "round data")  # noqa: E731
    per_sample = round_data(orw) // orw.samples_per_process  # one bf16 latent: 2 bytes an element
    assert round_data(s) == s.samples_per_process * per_sample * (1 + 2 * 2 * 2)


def test_diffusion_nft_plans_its_sampler_pass(tiny_sd3_path, tiny_planner):
    from conftest import for_objective

    cfg = TrainConfig(**for_objective(tiny_run_config(tiny_sd3_path, "unused-output-dir"), "diffusion_nft"))
    s = PlanSettings.from_train_config(cfg)
    assert s.sampler_pass and s.reference_pass and s.latents_per_sample == 1  # kl_beta 1e-4: a reference pass too
    assert not _tiny_settings(tiny_sd3_path).sampler_pass
    with_sampler = tiny_planner.train_step_peak(s, batch=2)
    assert s.train_passes == ("sampler", "reference", "policy")  # objectives/nft.py's order
    assert with_sampler >= tiny_planner.train_step_peak(replace(s, train_passes=("reference", "policy")), batch=2) > 0


def test_the_digits_name_plans_the_cached_base_and_never_builds_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path / "empty-cache"))
    assert memory.main(["--config", os.path.join(REPO, "configs", "digits_even.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'orw-diffusers/digits' is not built yet" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "empty-cache").exists()


def test_the_training_trace_runs_the_objectives_own_passes(tiny_sd3_path, tiny_planner):
    """The passes come from running the objective's losses, in its order; without the KL term Flow-GRPO plans
    (no reference pass) and its training peak is not above the plan with one."""
    grpo = dict(objective="flow_grpo", num_sampling_steps=4, sde_window_size=2, train_batch_size=2, sample_batch_size=2)
    settings = {
        kl: PlanSettings.from_train_config(TrainConfig(**tiny_run_config(tiny_sd3_path, "out", kl_beta=kl, **grpo)))
        for kl in (0.0, 0.04)
    }
    assert settings[0.0].train_passes == ("policy",)
    assert settings[0.04].train_passes == ("policy", "reference")  # objectives/flow_grpo.py: the KL after the policy
    without, with_reference = (tiny_planner.plan(settings[kl]) for kl in (0.0, 0.04))
    assert 0 < without.phase_total("train") <= with_reference.phase_total("train")
    # the reference forward after the policy's (its activations still held) costs more than before it (ORW's order)
    s = settings[0.04]
    assert tiny_planner.train_step_peak(s, batch=2) >= tiny_planner.train_step_peak(
        replace(s, train_passes=("reference", "policy")), batch=2
    )
    orw = _tiny_settings(tiny_sd3_path)
    assert orw.train_passes == ("reference", "policy")
    no_w2 = TrainConfig(**tiny_run_config(tiny_sd3_path, "out", w2_coefficient=0.0))
    assert PlanSettings.from_train_config(no_w2).train_passes == ("policy",)


def _velocity_run(**overrides) -> TrainConfig:
    values = dict(model_factory="orw_diffusers.digits.pixel:pixel_mlp", model_kwargs={"width": 16, "depth": 2},
                  output_dir="unused-output-dir", prompts=[""], images_per_prompt=4, sample_batch_size=4,
                  train_batch_size=4, num_sampling_steps=2, reward="jpeg_compressibility", mixed_precision="no",
                  rank=4)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_a_plain_velocity_model_plans_as_its_policy_holds_it(capsys):
    """policy: full trains every weight in fp32 beside the policy's reference and sampler copies; LoRA keeps the
    module frozen and trains two adapters. The planner asks the policy (its attach and its modules)."""
    from orw_diffusers.digits.pixel import pixel_mlp
    from orw_diffusers.memory.velocity import VelocityPlanner

    params = sum(p.numel() for p in pixel_mlp(width=16, depth=2).parameters())
    cfg = _velocity_run(policy="full")
    planner = VelocityPlanner.from_config(cfg)
    s = PlanSettings.from_train_config(cfg)
    full = planner.plan(s)
    weights = {item.name: item.bytes for item in full.items if item.group in ("full fine-tuning", "frozen weights")}
    assert weights == {
        "velocity model: trained weights (0.00 B params + buffers)": 4 * params,
        "velocity model: the policy's reference copy": 4 * params,
        "velocity model: the policy's sampler copy": 4 * params,
        "AdamW state (2 moments, fp32)": 8 * params,
        "gradients (fp32)": 4 * params,
    }
    assert full.policy == "policy full" and full.phase_total("train") > full.phase_total("sample") > 0
    lora = planner.plan(replace(s, policy="lora"))
    assert lora.item("velocity model (0.00 B params + buffers)").bytes == 4 * params
    assert lora.phase_total("train") < full.phase_total("train")
    # the objective's step, as for a pipeline: no W2 term, no reference pass
    no_ref = PlanSettings.from_train_config(_velocity_run(policy="full", w2_coefficient=0.0))
    assert no_ref.train_passes == ("policy",)
    assert 0 < planner.train_step_peak(no_ref) <= planner.train_step_peak(s)
    # and from the command line
    argv = ["--model_factory", "orw_diffusers.digits.pixel:pixel_mlp", "--model_kwargs", '{"width": 16, "depth": 2}',
            "--prompts", '[""]', "--images_per_prompt", "4", "--reward", "jpeg_compressibility", "--policy", "full",
            "--gpu_memory", "1GiB"]  # fmt: skip
    assert memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "policy full" in out and "the policy's sampler copy" in out
    assert memory.main(argv + ["--gradient_checkpointing", "true"]) == 2
    assert capsys.readouterr().err.startswith("error: gradient_checkpointing: the memory planner does not plan")
