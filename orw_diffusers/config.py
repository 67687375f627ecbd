"""Typed run configuration: YAML file + ``--key value`` overrides, validated before any model loads.

Keys follow diffusers' training scripts where one exists (``pretrained_model_name_or_path``,
``learning_rate``, ...); the method's keys keep the paper's names (``w2_coefficient``, ``temperature``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import yaml

from .dtypes import DTYPE_NAMES, MIXED_PRECISIONS
from .errors import ConfigError


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = _help(
        "Hub id or local directory of a diffusers flow-matching pipeline (StableDiffusion3Pipeline, FluxPipeline), "
        "or 'orw-diffusers/digits': the CPU digits base of the demo, read from the cache ($ORW_DIFFUSERS_CACHE, "
        "default ~/.cache/orw_diffusers) and built there (minutes, on CPU) when first loaded.",
        "stabilityai/stable-diffusion-3.5-medium",
    )
    revision: Optional[str] = _help("Hub revision (branch, tag or commit) of the model.", None)
    variant: Optional[str] = _help("Weight file variant to load, e.g. 'fp16'.", None)
    load_t5: bool = _help("Load the T5 text encoder (SD3). False saves ~9 GB; T5 context is then zeros.", True)
    max_sequence_length: int = _help("T5 token length of the prompt context (diffusers' default 256).", 256)
    # --- plain velocity models (model_factory; pretrained_model_name_or_path is then unused) -------
    model_factory: Optional[str] = _help(
        "'module:function' or 'file.py:function' returning an nn.Module called as model(t, x[, y=labels]) "
        "(torchcfm's convention: t = 0 noise, t = 1 data, the velocity towards the data). Set: train it instead "
        "of a pipeline (pixel space; class-conditional when it has an int num_classes, prompts then being labels).",
        None,
    )
    model_kwargs: Any = _help("Keyword arguments of model_factory (a mapping).", None)
    model_checkpoint: Optional[str] = _help(
        "Weights of the model_factory model: a .safetensors state dict, or a torch file read with "
        "weights_only=True: torchcfm's {net_model, ema_model, optim, sched, step} (ema_model when present; the "
        "optimizer and scheduler are never restored) or a bare state dict.",
        None,
    )
    checkpoint_key: Optional[str] = _help(
        "The entry of model_checkpoint to load, e.g. 'net_model'. Default: 'ema_model' if present, else 'net_model'.",
        None,
    )
    image_shape: Optional[list[int]] = _help(
        "[C, H, W] of a sample (C 1 or 3). Default: the model's in_channels and image_size (torchcfm's UNet).", None
    )
    data_range: list[float] = _help(
        "[low, high]: the pixel range of the model's data (torchcfm's [-1, 1]); rewards see images in [0, 1].",
        factory=lambda: [-1.0, 1.0],
    )
    clip_samples: bool = _help(
        "Plain velocity models: clamp each rollout to data_range before it is scored and trained on, so the model "
        "never learns from samples outside the data's range (at alpha 0 their scale can run away; see "
        "docs/results.md). Off by default, as in the paper's code.",
        False,
    )
    null_class: Optional[int] = _help(
        "Class-conditional models: the label of classifier-free guidance's unconditional branch "
        "(needed for guidance_scale > 1).",
        None,
    )
    # --- output, logging ---------------------------------------------------------------------
    output_dir: str = _help("Where weights, config.yaml, metrics.jsonl and samples go.", "orw-cfm-w2-output")
    seed: int = _help("Seed of every random draw (sampling noise, training noise, sigmas, prompt order).", 0)
    log_sample_rewards: bool = _help(
        "Append every sample's prompt, reward and weight (global order) to output_dir/rewards.jsonl each round.", False
    )
    report_to: str = _help(
        "Accelerate tracker: 'tensorboard' (logs in output_dir/logs), 'wandb', or any other tracker Accelerate "
        "knows (aim, comet_ml, mlflow, clearml, dvclive, swanlab, trackio); each needs its package. 'all': every "
        "installed one; 'none': off.",
        "tensorboard",
    )
    tracker_project: str = _help("Project name of the trackers (e.g. the wandb project).", "orw-cfm-w2")
    tracker_run_name: Optional[str] = _help("Run name shown by the trackers (wandb). Default: the tracker's.", None)
    # --- precision, memory -------------------------------------------------------------------
    mixed_precision: Optional[str] = _help(
        "'no', 'fp16' or 'bf16'. Frozen weights use this dtype, trained ones stay fp32 (policy full: every weight). "
        "Default: Accelerate's (`accelerate launch --mixed_precision`, its config file, or "
        "ACCELERATE_MIXED_PRECISION), else 'no'; output_dir/config.yaml records the value the run used.",
        None,
    )
    gradient_checkpointing: bool = _help("Recompute transformer activations in backward to save memory.", False)
    # --- policy: how the trained weights, the sampler and the reference are held ---------------
    policy: Optional[str] = _help(
        "'lora' (two adapters; reference = adapters off) or 'full' (every weight trained; a frozen reference copy "
        "and a sampler copy). Default: the model's (pipelines: lora; plain velocity models: full).",
        None,
    )
    # --- LoRA --------------------------------------------------------------------------------
    rank: int = _help("LoRA rank (policy lora).", 32)
    lora_alpha: Optional[float] = _help("LoRA alpha (scale = lora_alpha / rank). Default: equal to rank.", None)
    lora_target_modules: Optional[list[str]] = _help(
        "Module names to adapt (diffusers' lora_layers: one comma-separated string). Default: the family's "
        "attention projections.",
        None,
    )
    lora_dropout: float = _help("Dropout probability of the trained LoRA layers (peft's lora_dropout).", 0.0)
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = _help(
        "AdamW learning rate of the trained weights (the LoRA, or every weight with policy full).", 1e-4
    )
    lr_warmup_steps: int = _help("Linear warmup in optimizer steps, then constant.", 0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables clipping).", 1.0)
    adam_beta1: float = _help("AdamW beta1.", 0.9)
    adam_beta2: float = _help("AdamW beta2.", 0.999)
    adam_weight_decay: float = _help("AdamW weight decay.", 1e-4)
    adam_epsilon: float = _help("AdamW epsilon.", 1e-8)
    gradient_accumulation_steps: int = _help("Micro-batches accumulated per optimizer step.", 1)
    # --- the objective ---------------------------------------------------------------------
    objective: str = _help(
        "The training objective: 'orw_cfm_w2' (online reward-weighted CFM with W2 regularisation), 'flow_grpo' "
        "(SDE rollouts, group-relative advantages, clipped ratio + KL) or 'diffusion_nft' (ODE rollouts, "
        "advantages as optimality probabilities, the positive/negative implicit-policy loss on the forward path). "
        "A key of another objective is an error.",
        "orw_cfm_w2",
    )
    # --- ORW-CFM-W2 (objective: orw_cfm_w2) --------------------------------------------------
    w2_coefficient: float = _help("alpha: weight of the W2 term mean((v_ft - v_ref)^2). 0 = unregularised.", 1.0)
    temperature: float = _help("tau: reward weights are exp(temperature * reward), normalised.", 0.5)
    weight_normalization: str = _help(
        "'batch' (mean 1 over the global batch), 'per_prompt' (mean 1 per prompt group), "
        "'none' (raw exp(temperature * r)), 'uniform' (all 1: reward-free control).",
        "batch",
    )
    log_w2_distance: bool = _help(
        "Run the reference pass even when w2_coefficient is 0, so w2_loss (the W2 bound) is measured.", False
    )
    sigma_sampling: str = _help(
        "Training sigma distribution: 'uniform' (the paper) or 'logit_normal'. diffusers' weighting_scheme is "
        "read as this key ('none' = uniform, 'logit_normal').",
        "uniform",
    )
    logit_mean: float = _help("Mean of the logit-normal sigma distribution.", 0.0)
    logit_std: float = _help("Std of the logit-normal sigma distribution.", 1.0)
    w2_target: Optional[float] = _help(
        "A W2 budget: each round alpha is multiplied by exp(w2_adapt_rate * clip(log(w2_loss / w2_target), -1, 1)) "
        "(PPO's adaptive KL, for W2), so that the measured w2_loss tracks this value; w2_coefficient is the starting "
        "alpha. null: alpha stays w2_coefficient.",
        None,
    )
    w2_coefficient_min: float = _help("With w2_target: the smallest alpha the controller may set (> 0).", 1.0e-4)
    w2_coefficient_max: float = _help("With w2_target: the largest alpha the controller may set.", 100.0)
    w2_adapt_rate: float = _help(
        "With w2_target: the controller's step; alpha changes by at most a factor exp(w2_adapt_rate) per round.", 0.1
    )
    # --- Flow-GRPO (objective: flow_grpo) -------------------------------------------------
    noise_level: float = _help(
        "a: the SDE's diffusion a sqrt(sigma / (1 - sigma)) on the stochastic steps (cps: std sigma_next sin(a pi/2)).",
        0.7,
    )
    sde_type: str = _help("'sde' (Flow-GRPO's reverse SDE) or 'cps' (coefficients-preserving sampling).", "sde")
    sde_window_size: int = _help(
        "Stochastic (and trained) steps per rollout, a window placed at random in sde_window_range each round; "
        "the other steps are Euler. 0: every step but the last.",
        0,
    )
    sde_window_range: Optional[list[int]] = _help(
        "[low, high]: the steps the SDE window may cover. Default: the first half of the trajectory.", None
    )
    global_std: bool = _help(
        "Advantages (r - group mean) / std with the std of the whole batch (true) or of the prompt's group "
        "(flow_grpo and diffusion_nft).",
        True,
    )
    adv_clip_max: float = _help(
        "Advantages are clipped to +-adv_clip_max (flow_grpo and diffusion_nft; diffusion_nft maps the clipped "
        "advantage to r = A / (2 adv_clip_max) + 0.5).",
        5.0,
    )
    clip_range: float = _help("epsilon of the clipped ratio clip(rho, 1 - epsilon, 1 + epsilon).", 1e-4)
    kl_beta: Optional[float] = _help(
        "Weight of the KL to the reference (the base model): flow_grpo's of each trained step's transition, "
        "diffusion_nft's mean ||v_theta - v_ref||^2. 0: no reference pass. Default (null): the objective's, 0.04 for "
        "flow_grpo, 1e-4 for diffusion_nft.",
        None,
    )
    kl_type: str = _help(
        "The KL's scale: 'flow_grpo' (mean squared gap of the two transition means over 2 (a sqrt(sigma/(1-sigma)))^2, "
        "as Flow-GRPO's code, so its kl_beta values carry over) or 'exact' (over 2 std^2, the KL of the two Gaussian "
        "steps: larger by 1 / (sigma - sigma_next) with sde_type: sde; the same with cps).",
        "flow_grpo",
    )
    # --- DiffusionNFT (objective: diffusion_nft; shares kl_beta, adv_clip_max, global_std) ------
    nft_beta: float = _help(
        "beta: the implicit policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta "
        "(v_old: the sampler's velocity); smaller keeps each update closer to the sampler (a trust region).",
        1.0,
    )
    nft_loss_space: str = _help(
        "'x0' (the authors' code: ||x0_hat - x0||^2 of each implicit policy over its own sg(mean |x0_hat - x0|)) or "
        "'velocity' (the paper's ||v_implicit - (eps - x0)||^2, unnormalised).",
        "x0",
    )
    nft_timestep_fraction: float = _help(
        "Trained timesteps per sample and round: int(num_sampling_steps * fraction) (at least 1) of the rollout's "
        "grid, in a random order per sample, each with fresh noise (a forward-backward each).",
        0.99,
    )
    sampler_decay_rate: float = _help(
        "After each round the sampler (the old policy) moves towards the trained one: sampler <- eta sampler + "
        "(1 - eta) trained, eta = min(sampler_decay_rate * (steps - sampler_decay_start), sampler_decay_max) over "
        "the optimizer steps done (0 before sampler_decay_start). 0: a hard copy every round.",
        0.001,
    )
    sampler_decay_max: float = _help("The largest eta of the sampler's soft update, in [0, 1).", 0.5)
    sampler_decay_start: int = _help("Optimizer steps before the sampler's soft update keeps any of the old.", 0)
    # --- rollouts and optimisation (every objective) ------------------------------------------
    sampler_update_interval: int = _help(
        "Copy the trained weights into the sampler every N rounds (diffusion_nft: soft-update it every N rounds).", 1
    )
    num_sampling_steps: int = _help(
        "ODE steps when sampling a round's images. Too few feed the solver's error back into training.",
        20,
    )
    sampling_solver: str = _help(
        "Rollout ODE solver: 'euler' (as the diffusers pipelines sample) or 'heun' (second order, 2N - 1 model "
        "evaluations for N steps). On the digits base the reward-free control keeps the base's class mix with 10 Heun "
        "or 40 Euler steps, not with 20 Euler steps (docs/results.md).",
        "euler",
    )
    guidance_scale: float = _help("Classifier-free guidance scale when sampling (1 disables CFG).", 4.5)
    negative_prompt: str = _help("Negative prompt of classifier-free guidance.", "")
    cfg_training: str = _help(
        "Which velocity the loss trains with classifier-free guidance (guidance_scale > 1 on a true-CFG family such "
        "as SD3): 'guided' (v_u + g (v_c - v_u), the field the rollouts integrate; both branches in one batched "
        "forward) or 'conditional' (v_c alone: the trained field is not the sampled one, and the change can run "
        "away). No effect without true CFG (FLUX.1-dev embeds its guidance).",
        "guided",
    )
    num_inner_epochs: int = _help("Passes over each round's samples.", 1)
    # --- prompts -----------------------------------------------------------------------------
    prompts: Optional[list[str]] = _help("Training prompts, inline.", None)
    prompt_file: Optional[str] = _help("Prompts file: .txt (one per line), .jsonl or .csv (column 'prompt').", None)
    prompt_dataset: Optional[str] = _help("A `datasets` dataset (hub id or local dir/file) holding prompts.", None)
    prompt_column: str = _help("Column holding the prompt in prompt_file (.jsonl/.csv) or prompt_dataset.", "prompt")
    prompt_split: str = _help("Split of prompt_dataset.", "train")
    # --- sizes -------------------------------------------------------------------------------
    resolution: int = _help("Image side in pixels.", 512)
    num_epochs: int = _help(
        "Online rounds: sample -> reward -> weights -> optimise -> refresh. The length of a run (diffusers' "
        "num_train_epochs and max_train_steps have no equivalent: a round's optimizer steps are derived).",
        100,
    )
    prompts_per_round: Optional[int] = _help("Prompts drawn per round (global). Default: all prompts.", None)
    images_per_prompt: int = _help("Images sampled per prompt per round.", 4)
    sample_batch_size: int = _help("Images generated per forward pass, per process.", 4)
    train_batch_size: int = _help("Samples per training micro-batch, per process.", 2)
    # --- reward ------------------------------------------------------------------------------
    reward: Any = _help(
        "A reward name, {name: weight, ...}, or a list of {name, weight, kwargs}. "
        "Names: the registry's or 'module:function' / 'file.py:function'.",
        "clip_score",
    )
    reward_device: Optional[str] = _help("Device of the reward models. Default: the training device.", None)
    reward_dtype: str = _help("dtype of the reward models: 'float32', 'float16' or 'bfloat16'.", "float32")
    reward_batch_size: int = _help("Images scored per reward-model forward pass.", 32)
    # --- held-out judges and the reward-hacking alarm (every objective) -----------------------
    eval_reward: Any = _help(
        "Held-out rewards (the syntax of reward), scored on every round's samples and on the validation renders "
        "and logged as eval/<name>_mean; never trained on. null: none.",
        None,
    )
    hacking_window: int = _help(
        "Rounds the reward-hacking alarm looks back over: it fires when, over the last hacking_window rounds, the "
        "training reward's least-squares change is >= hacking_min_rise while an eval_reward's is <= -hacking_min_drop.",
        20,
    )
    hacking_min_rise: float = _help(
        "The alarm's least rise of the mean training reward over the window, in its units (0: it did not fall; a "
        "hacked reward often saturates before the judges fall).",
        0.0,
    )
    hacking_min_drop: float = _help(
        "The alarm's least fall of a mean eval_reward over the window, in its units; set it above the judge's noise "
        "(docs/results.md: 0.1 for a [0, 1] judge on 128 samples per round).",
        0.1,
    )
    stop_on_reward_hacking: bool = _help(
        "When the alarm fires, save a checkpoint, the weights and the model card, and end the run.", False
    )

    # --- long runs: checkpoints, logging, hub -------------------------------------------------
    checkpointing_steps: Optional[int] = _help(
        "Save a resumable checkpoint every N rounds (online rounds, as num_epochs counts them; not optimizer "
        "steps), and after the last round, to output_dir/checkpoints/. 0 or null: off.",
        None,
    )
    checkpoints_total_limit: Optional[int] = _help(
        "Keep at most this many checkpoints; the oldest are deleted first, the newest never. null: keep all.", None
    )
    resume_from_checkpoint: Optional[str] = _help(
        "Continue a run from a checkpoint directory, a checkpoint name such as 'checkpoint-000010' (in "
        "output_dir/checkpoints/), or 'latest' (the newest complete checkpoint there; a fresh start if there is none).",
        None,
    )
    sample_log_interval: int = _help(
        "Every N rounds (from round 0), save a grid of the round's samples with their rewards to "
        "output_dir/samples/round_XXXX.png and the tracker. 0: off.",
        10,
    )
    validation_prompts: Optional[list[str]] = _help(
        "Prompts rendered with fixed noise by the sampler before training and every validation_interval "
        "rounds, to output_dir/samples/validation_XXXX.png (XXXX = rounds trained) and the tracker. diffusers' "
        "validation_prompt (one prompt) is read as a one-item list.",
        None,
    )
    validation_interval: int = _help("Rounds between two renders of validation_prompts.", 10)
    per_prompt_log_max: int = _help(
        "Log each prompt's mean reward as reward_by_prompt/<i> (i: line of output_dir/prompts.txt) in rounds "
        "with at most this many unique prompts. 0: off.",
        16,
    )
    push_to_hub: bool = _help(
        "After training, upload the weights and model card to the Hub repo hub_model_id (token from HF_TOKEN or "
        "`huggingface-cli login`).",
        False,
    )
    hub_model_id: Optional[str] = _help(
        "Hub repo to push to: 'name' (your namespace) or 'namespace/name'. Default: output_dir's folder name.", None
    )
    hub_private: bool = _help(
        "Create the Hub repo as private (if it does not exist yet). diffusers' hub_private_repo is read as this key.",
        False,
    )

    def __post_init__(self) -> None:
        # A shared key left null takes the chosen objective's default (an unknown objective is validate's error).
        from .objectives import OBJECTIVES

        chosen = OBJECTIVES.get(self.objective)
        for key, value in (chosen.key_defaults.items() if chosen else ()):
            if getattr(self, key) is None:
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CFG_TRAININGS = ("guided", "conditional")
#: The name of the demo's CPU digits base (``orw_diffusers.digits``), resolved by ``resolve_model_path``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Sizes:
    """Every derived size, computed in one place and logged at start-up."""

    num_processes: int
    prompts_per_round: int
    samples_per_round: int  # global
    samples_per_process: int
    sample_batches_per_process: int
    micro_batches_per_process: int  # per inner epoch
    optimizer_steps_per_round: int

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def resolved_mixed_precision(cfg: TrainConfig) -> str:
    """The precision a run uses: the config's ``mixed_precision``, else Accelerate's (``accelerate launch
    --mixed_precision`` and its config file both set ``ACCELERATE_MIXED_PRECISION``), else 'no'.

    What ``Accelerator(mixed_precision=None)`` reads; the trainer then takes ``accelerator.mixed_precision``.
    """
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def resolve_model_path(path: str) -> str:
    """``pretrained_model_name_or_path`` -> what diffusers loads: ``DIGITS_MODEL_NAME`` becomes the cached
    digits base, built first if it is missing (minutes, on CPU); any other value is returned as it is."""
    from .digits.data import DIGITS_MODEL_NAME

    if path != DIGITS_MODEL_NAME:
        return path
    from .digits.base import ensure_digits_base

    return ensure_digits_base()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert one value to the annotated type; YAML already typed most of them."""
    if _is_optional(tp):
        if value is None:
            return None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(name, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


# Keys holding local paths: '~' and $VARIABLES are expanded, as a shell would.
_PATH_KEYS = ("pretrained_model_name_or_path", "output_dir", "prompt_file", "prompt_dataset", "resume_from_checkpoint",
              "model_checkpoint")


# diffusers' weighting_scheme values that mean one of our sigma_sampling values ('none': uniform timesteps).
_WEIGHTING_SCHEMES = {"none": "uniform", "uniform": "uniform", "logit_normal": "logit_normal"}


def _weighting_scheme(value: Any) -> Any:
    if value not in _WEIGHTING_SCHEMES:
        raise ConfigError(
            f"weighting_scheme: {value!r} is not supported; accepted: none or uniform (sigma_sampling: uniform), "
            f"logit_normal"
        )
    return _WEIGHTING_SCHEMES[value]


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


#: diffusers' training-script names where ours differ: alias -> (our key, how the value converts).
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "validation_prompt": ("validation_prompts", lambda v: [v] if isinstance(v, str) else v),
    "hub_private_repo": ("hub_private", lambda v: v),
    "lora_layers": ("lora_target_modules", _comma_list),
    "weighting_scheme": ("sigma_sampling", _weighting_scheme),
}

# Keys of diffusers' scripts that have no equivalent here, and what to set instead.
_NO_EQUIVALENT = {
    "num_train_epochs": "the length of a run is num_epochs (online rounds: sample -> reward -> optimise)",
    "max_train_steps": "the length of a run is num_epochs (online rounds); a round's optimizer steps are derived "
    "from the batch sizes and logged at start",
}


def apply_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with diffusers' names (``ALIASES``) renamed to ours and their values converted."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in _NO_EQUIVALENT:
            raise ConfigError(f"{key}: not a key of this trainer; {_NO_EQUIVALENT[key]}: set num_epochs instead")
        if key in ALIASES:
            target, convert = ALIASES[key]
            if target in values:
                raise ConfigError(f"{key}: set either {key} (diffusers' name) or {target}, not both")
            key, value = target, convert(value)
        out[key] = value
    return out


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a flat dict; unknown keys are an error that lists the known ones' nearest match.

    diffusers' names of ``ALIASES`` are read as ours."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {}
    for key, value in apply_aliases(values).items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}; see the configuration reference in docs/configuration.md")
        kwargs[key] = _coerce(key, value, hints[key])
        if key in _PATH_KEYS and isinstance(kwargs[key], str):
            kwargs[key] = os.path.expanduser(os.path.expandvars(kwargs[key]))
    from .objectives import check_objective_keys

    check_objective_keys(kwargs.get("objective", TrainConfig.objective), kwargs)
    return TrainConfig(**kwargs)


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of keys to values")
    return values


def _kind(key: str) -> tuple[str, bool]:
    """How the command line reads ``key``: ('bool' | 'list' | 'value', whether its words are strings)."""
    if key in ALIASES:
        return ("bool", False) if key == "hub_private_repo" else ("value", True)
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        return "value", False  # an unknown key: from_dict names it
    tp = hints[key]
    if _is_optional(tp):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        return "bool", False
    if typing.get_origin(tp) is list:
        return "list", typing.get_args(tp)[0] is str
    return "value", tp is str


def _parse_word(raw: str, is_str: bool) -> Any:
    """One command-line word as YAML (numbers, null, [lists], {mappings}); a string key keeps words such as
    'yes', '1' or 'a: b' as written."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if is_str and value is not None and not isinstance(value, (str, list)):
        return raw
    return value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Command-line overrides, read as diffusers' scripts take them:

    - ``--key value`` or ``--key=value``; values are YAML (``--reward '{clip_score: 1.0}'``);
    - booleans bare (``--gradient_checkpointing``), with a value (``--push_to_hub false``) or ``--no_<key>``;
    - lists as separate words (``--validation_prompts "a cat" "a dog"``) or one YAML list (``'[a, b]'``).

    Keys come back with ``-`` written ``_``; diffusers' names (``ALIASES``) are converted by ``from_dict``.
    """
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides are written --key value")
        key, has_value, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        words = []  # the words up to the next --key
        while not has_value and i < len(argv) and not argv[i].startswith("--"):
            words.append(argv[i])
            i += 1
        kind, is_str = _kind(key)
        negated = key.startswith("no_") and _kind(key[3:])[0] == "bool" and _kind(key)[0] != "bool"
        if negated:
            if has_value or words:
                raise ConfigError(f"--{key}: takes no value (it sets {key[3:]} to false)")
            values[key[3:]] = False
            continue
        if has_value:
            words = [raw]
        if kind == "bool" and not words:
            values[key] = True
        elif not words:
            raise ConfigError(f"--{key}: missing value")
        elif kind == "list" and len(words) > 1:
            values[key] = [raw_word if is_str else _parse_word(raw_word, False) for raw_word in words]
        elif len(words) > 1:
            raise ConfigError(
                f"--{key}: one value expected, got {len(words)} ({' '.join(words)!r}); quote a value with spaces"
            )
        else:
            values[key] = _parse_word(words[0], is_str)
    return values


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """``--config run.yaml [--key value ...]``: the YAML first, then the overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    description = "Fine-tune a flow-matching model towards a reward (ORW-CFM-W2, Flow-GRPO or DiffusionNFT)."
    parser = argparse.ArgumentParser(add_help=True, allow_abbrev=False, description=description)
    parser.add_argument("--config", default=None, help="YAML run config; any key can be overridden with --key value")
    args, rest = parser.parse_known_args(argv)
    values = apply_aliases(load_yaml(args.config)) if args.config else {}
    values.update(apply_aliases(parse_overrides(rest)))  # an alias on the command line overrides the YAML's key
    return from_dict(values)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name}: {value!r} must be a positive integer")


def check_model_path(path: str, key: str = "pretrained_model_name_or_path") -> None:
    """A local path must be a pipeline directory; anything else must look like a hub id ('org/name').

    ``DIGITS_MODEL_NAME`` is never taken for a hub id, and nothing is built here: ``resolve_model_path``
    builds the digits base when the model loads (its build needs scikit-learn, checked now)."""
    from .digits.data import DIGITS_MODEL_NAME

    if path == DIGITS_MODEL_NAME:
        import importlib.util

        from .digits.data import BASE_NAME, digits_cache_dir

        cached = os.path.isfile(os.path.join(digits_cache_dir(), BASE_NAME, "model_index.json"))
        if not cached and importlib.util.find_spec("sklearn") is None:
            raise ConfigError(
                f"{key}: {path!r} builds the digits base on first use, which needs scikit-learn "
                f"(`pip install scikit-learn`, or the package's demo extra)"
            )
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(f"{key}: {path!r} has no model_index.json; expected a diffusers pipeline directory")
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise ConfigError(f"{key}: {path!r} is not an existing local directory nor a hub id like 'org/model'")


def validate(cfg: TrainConfig, num_processes: int = 1, model_given: bool = False) -> Sizes:
    """Check every value and cross-field rule; return the derived sizes. Loads no model.

    ``model_given``: the trainer gets a plain velocity model object (``orw_diffusers.cfm``), so
    ``pretrained_model_name_or_path`` is not read and the velocity keys apply without ``model_factory``.
    """
    from .objectives import validate_objective
    from .prompts import load_prompts
    from .rewards import parse_reward_spec
    from .sampling import SAMPLING_SOLVERS

    precision = resolved_mixed_precision(cfg)
    if precision not in MIXED_PRECISIONS:
        source = "" if cfg.mixed_precision is not None else " (ACCELERATE_MIXED_PRECISION, set by accelerate launch)"
        raise ConfigError(f"mixed_precision: {precision!r}{source} is not one of {', '.join(MIXED_PRECISIONS)}")
    validate_objective(cfg)
    _check_choice("sampling_solver", cfg.sampling_solver, SAMPLING_SOLVERS)
    _check_choice("report_to", cfg.report_to, report_to_choices())
    _check_choice("cfg_training", cfg.cfg_training, CFG_TRAININGS)
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate: {cfg.learning_rate!r} must be > 0")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm: {cfg.max_grad_norm!r} must be >= 0 (0 disables clipping)")
    if cfg.lr_warmup_steps < 0:
        raise ConfigError(f"lr_warmup_steps: {cfg.lr_warmup_steps!r} must be >= 0")
    if cfg.guidance_scale < 1:
        raise ConfigError(f"guidance_scale: {cfg.guidance_scale!r} must be >= 1 (1 disables guidance)")
    _check_positive(
        cfg,
        "rank",
        "num_epochs",
        "images_per_prompt",
        "sample_batch_size",
        "train_batch_size",
        "gradient_accumulation_steps",
        "sampler_update_interval",
        "num_sampling_steps",
        "num_inner_epochs",
        "resolution",
        "max_sequence_length",
        "reward_batch_size",
    )
    _check_choice("reward_dtype", cfg.reward_dtype, DTYPE_NAMES)
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha: {cfg.lora_alpha!r} must be > 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout: {cfg.lora_dropout!r} must be in [0, 1)")
    from .digits.data import DIGITS_MODEL_NAME
    from .models.velocity import validate_velocity_config
    from .policies import POLICIES

    if cfg.policy is not None:
        _check_choice("policy", cfg.policy, tuple(POLICIES))
    validate_velocity_config(cfg, model_given)
    if cfg.model_factory is None and not model_given:  # a pipeline: the path names one, its family takes the precision
        check_model_path(cfg.pretrained_model_name_or_path)
        if cfg.pretrained_model_name_or_path != DIGITS_MODEL_NAME:  # an SD3 pipeline: it runs every precision
            from .models import check_model_precision

            check_model_precision(cfg.pretrained_model_name_or_path, cfg.revision, precision)
    parse_reward_spec(cfg.reward)  # names and weights; the models load later
    prompts = load_prompts(cfg)
    if cfg.prompts_per_round is not None and cfg.prompts_per_round <= 0:
        raise ConfigError(f"prompts_per_round: {cfg.prompts_per_round!r} must be a positive integer")
    _validate_long_runs(cfg)
    from .judges import validate_judges

    validate_judges(cfg)
    return derive_sizes(cfg, num_prompts=len(prompts), num_processes=num_processes)


def report_to_choices() -> tuple[str, ...]:
    """``report_to``'s values: 'none', 'all' and every tracker Accelerate knows (``LOGGER_TYPE_TO_CLASS``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return ("none", "all", *LOGGER_TYPE_TO_CLASS)




def _validate_long_runs(cfg: TrainConfig) -> None:
    """The keys of the '# --- long runs' block: checkpoints, trackers, validation renders, the Hub."""
    from .checkpoint import find_checkpoint, list_checkpoints

    for name in ("checkpointing_steps", "sample_log_interval", "per_prompt_log_max"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name}: {value!r} must be >= 0 (0 turns it off)")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit: {cfg.checkpoints_total_limit!r} must be >= 1 (null keeps all)")
    resume = cfg.resume_from_checkpoint
    if resume is not None and resume != "latest" and find_checkpoint(resume, cfg.output_dir) is None:
        names = [os.path.basename(path) for _, path in list_checkpoints(cfg.output_dir)]
        have = f"; {cfg.output_dir!r} holds {', '.join(names)}" if names else ""
        raise ConfigError(
            f"resume_from_checkpoint: {resume!r} is neither 'latest', a checkpoint name in output_dir/checkpoints/ "
            f"(checkpoint-NNNNNN) nor a complete checkpoint directory (holding trainer_state.json){have}"
        )
    # A fresh run must not share checkpoints/ with an earlier one: 'latest' could later pick the old run's.
    if resume is None and list_checkpoints(cfg.output_dir):
        raise ConfigError(
            f"resume_from_checkpoint: output_dir {cfg.output_dir!r} holds checkpoints of an earlier run; "
            f"set resume_from_checkpoint: latest to continue it, or use a new output_dir (or delete its checkpoints/)"
        )
    # Trackers are optional packages: say which one is missing now, not after the model has loaded.
    # ('all' takes whichever are installed, as Accelerate does.)
    if cfg.report_to not in ("all", "none"):
        import accelerate.utils

        available = getattr(accelerate.utils, f"is_{cfg.report_to}_available", None)
        if available is not None and not available():
            raise ConfigError(
                f"report_to: {cfg.report_to!r} needs `pip install {cfg.report_to}` (or set report_to: none)"
            )
    _check_positive(cfg, "validation_interval")
    if cfg.validation_prompts is not None:
        if not cfg.validation_prompts or not all(isinstance(p, str) and p.strip() for p in cfg.validation_prompts):
            raise ConfigError(f"validation_prompts: {cfg.validation_prompts!r} must be a non-empty list of prompts")
    if cfg.push_to_hub or cfg.hub_model_id is not None:
        from .hub import check_repo_id, default_repo_id

        check_repo_id(default_repo_id(cfg))  # hub_model_id, else output_dir's name


def derive_sizes(cfg: TrainConfig, num_prompts: int, num_processes: int) -> Sizes:
    prompts_per_round = cfg.prompts_per_round or num_prompts
    total = prompts_per_round * cfg.images_per_prompt
    if total % num_processes:
        raise ConfigError(
            f"prompts_per_round * images_per_prompt = {total} must be divisible by the {num_processes} processes"
        )
    per_process = total // num_processes
    if per_process % cfg.sample_batch_size:
        raise ConfigError(
            f"sample_batch_size: {cfg.sample_batch_size} must divide the {per_process} samples per process per round "
            f"(prompts_per_round * images_per_prompt / processes)"
        )
    if per_process % cfg.train_batch_size:
        raise ConfigError(
            f"train_batch_size: {cfg.train_batch_size} must divide the {per_process} samples per process per round"
        )
    micro = per_process // cfg.train_batch_size
    if micro % cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps} must divide the {micro} "
            f"training micro-batches per process per round"
        )
    return Sizes(
        num_processes=num_processes,
        prompts_per_round=prompts_per_round,
        samples_per_round=total,
        samples_per_process=per_process,
        sample_batches_per_process=per_process // cfg.sample_batch_size,
        micro_batches_per_process=micro,
        optimizer_steps_per_round=cfg.num_inner_epochs * micro // cfg.gradient_accumulation_steps,
    )


def save_yaml(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
