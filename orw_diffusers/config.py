"""Typed run configuration: YAML file + ``--key value`` overrides, validated before any model loads.

Keys follow diffusers' training scripts where one exists (``pretrained_model_name_or_path``,
``learning_rate``, ...); the method's keys keep the paper's names (``w2_coefficient``, ``temperature``).

Each part declares its keys next to its code (an objective in its file, the policies, the velocity models,
the rewards, the judges, checkpoints, the Hub) and checks them in its own ``validate_*``; this module holds
the loop's keys, composes the one flat ``TrainConfig`` from ``KEY_BLOCKS`` and runs every check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .checkpoint import CheckpointKeys, validate_checkpoint_keys
from .dtypes import MIXED_PRECISIONS
from .errors import ConfigError
from .hub import HubKeys, validate_hub_keys
from .judges import JudgeKeys, validate_judges
from .keys import KeyBlock, check_choice, check_off_or_count, check_positive, coerce, key_field, key_names
from .models.pipeline import PipelineKeys
from .models.velocity import VelocityKeys, validate_velocity_config
from .objectives import OBJECTIVES, validate_objective
from .overrides import apply_aliases, load_yaml, read_overrides
from .policies import LoRAKeys, PolicyKeys, validate_policy
from .rewards import RewardKeys, validate_reward_keys


# ----------------------------------------------------------------------------------------------
# The loop's own keys; every part declares its own next to its code (``keys.key_field``), and ``KEY_BLOCKS``
# lists them all in the order of docs/configuration.md.
# ----------------------------------------------------------------------------------------------


@dataclass
class OutputKeys:
    output_dir: str = key_field(
        "Where weights, config.yaml, metrics.jsonl and samples go.", "orw-cfm-w2-output", path=True
    )
    seed: int = key_field("Seed of every random draw (sampling noise, training noise, sigmas, prompt order).", 0)
    log_sample_rewards: bool = key_field(
        "Append every sample's prompt, reward and weight (global order) to output_dir/rewards.jsonl each round.", False
    )
    report_to: str = key_field(
        "Accelerate tracker: 'tensorboard' (logs in output_dir/logs), 'wandb', or any other tracker Accelerate "
        "knows (aim, comet_ml, mlflow, clearml, dvclive, swanlab, trackio); each needs its package. 'all': every "
        "installed one; 'none': off.",
        "tensorboard",
    )
    tracker_project: str = key_field("Project name of the trackers (e.g. the wandb project).", "orw-cfm-w2")
    tracker_run_name: Optional[str] = key_field("Run name shown by the trackers (wandb). Default: the tracker's.", None)


@dataclass
class PrecisionKeys:
    mixed_precision: Optional[str] = key_field(
        "'no', 'fp16' or 'bf16'. Frozen weights use this dtype, trained ones stay fp32 (policy full: every weight). "
        "Default: Accelerate's (`accelerate launch --mixed_precision`, its config file, or "
        "ACCELERATE_MIXED_PRECISION), else 'no'; output_dir/config.yaml records the value the run used.",
        None,
    )
    gradient_checkpointing: bool = key_field("Recompute transformer activations in backward to save memory.", False)


@dataclass
class OptimizerKeys:
    learning_rate: float = key_field(
        "AdamW learning rate of the trained weights (the LoRA, or every weight with policy full).", 1e-4
    )
    lr_warmup_steps: int = key_field("Linear warmup in optimizer steps, then constant.", 0)
    max_grad_norm: float = key_field("Gradient clipping norm (0 disables clipping).", 1.0)
    adam_beta1: float = key_field("AdamW beta1.", 0.9)
    adam_beta2: float = key_field("AdamW beta2.", 0.999)
    adam_weight_decay: float = key_field("AdamW weight decay.", 1e-4)
    adam_epsilon: float = key_field("AdamW epsilon.", 1e-8)
    gradient_accumulation_steps: int = key_field("Micro-batches accumulated per optimizer step.", 1)


@dataclass
class ObjectiveKeys:
    objective: str = key_field(
        "The training objective: 'orw_cfm_w2' (online reward-weighted CFM with W2 regularisation), 'flow_grpo' "
        "(SDE rollouts, group-relative advantages, clipped ratio + KL) or 'diffusion_nft' (ODE rollouts, "
        "advantages as optimality probabilities, the positive/negative implicit-policy loss on the forward path). "
        "A key of another objective is an error.",
        "orw_cfm_w2",
    )


@dataclass
class RolloutKeys:
    sampler_update_interval: int = key_field(
        "Copy the trained weights into the sampler every N rounds (diffusion_nft: soft-update it every N rounds).", 1
    )
    num_sampling_steps: int = key_field(
        "ODE steps when sampling a round's images. Too few feed the solver's error back into training.",
        20,
    )
    sampling_solver: str = key_field(
        "Rollout ODE solver: 'euler' (as the diffusers pipelines sample) or 'heun' (second order, 2N - 1 model "
        "evaluations for N steps). On the digits base the reward-free control keeps the base's class mix with 10 Heun "
        "or 40 Euler steps, not with 20 Euler steps (docs/results.md).",
        "euler",
    )
    guidance_scale: float = key_field("Classifier-free guidance scale when sampling (1 disables CFG).", 4.5)
    negative_prompt: str = key_field("Negative prompt of classifier-free guidance.", "")
    cfg_training: str = key_field(
        "Which velocity the loss trains with classifier-free guidance (guidance_scale > 1 on a true-CFG family such "
        "as SD3): 'guided' (v_u + g (v_c - v_u), the field the rollouts integrate; both branches in one batched "
        "forward) or 'conditional' (v_c alone: the trained field is not the sampled one, and the change can run "
        "away). No effect without true CFG (FLUX.1-dev embeds its guidance).",
        "guided",
    )
    num_inner_epochs: int = key_field("Passes over each round's samples.", 1)


@dataclass
class PromptKeys:
    prompts: Optional[list[str]] = key_field("Training prompts, inline.", None)
    prompt_file: Optional[str] = key_field(
        "Prompts file: .txt (one per line), .jsonl or .csv (column 'prompt').", None, path=True
    )
    prompt_dataset: Optional[str] = key_field(
        "A `datasets` dataset (hub id or local dir/file) holding prompts.", None, path=True
    )
    prompt_column: str = key_field(
        "Column holding the prompt in prompt_file (.jsonl/.csv) or prompt_dataset.", "prompt"
    )
    prompt_split: str = key_field("Split of prompt_dataset.", "train")


@dataclass
class SizeKeys:
    resolution: int = key_field("Image side in pixels.", 512)
    num_epochs: int = key_field(
        "Online rounds: sample -> reward -> weights -> optimise -> refresh. The length of a run (diffusers' "
        "num_train_epochs and max_train_steps have no equivalent: a round's optimizer steps are derived).",
        100,
    )
    prompts_per_round: Optional[int] = key_field("Prompts drawn per round (global). Default: all prompts.", None)
    images_per_prompt: int = key_field("Images sampled per prompt per round.", 4)
    sample_batch_size: int = key_field("Images generated per forward pass, per process.", 4)
    train_batch_size: int = key_field("Samples per training micro-batch, per process.", 2)


@dataclass
class LogKeys:
    sample_log_interval: int = key_field(
        "Every N rounds (from round 0), save a grid of the round's samples with their rewards to "
        "output_dir/samples/round_XXXX.png and the tracker. 0: off.",
        10,
    )
    validation_prompts: Optional[list[str]] = key_field(
        "Prompts rendered with fixed noise by the sampler before training and every validation_interval "
        "rounds, to output_dir/samples/validation_XXXX.png (XXXX = rounds trained) and the tracker. diffusers' "
        "validation_prompt (one prompt) is read as a one-item list.",
        None,
    )
    validation_interval: int = key_field("Rounds between two renders of validation_prompts.", 10)
    per_prompt_log_max: int = key_field(
        "Log each prompt's mean reward as reward_by_prompt/<i> (i: line of output_dir/prompts.txt) in rounds "
        "with at most this many unique prompts. 0: off.",
        16,
    )


def _objective_blocks() -> list[KeyBlock]:
    """One block per objective, its own keys; the keys it shares with another are declared there."""
    blocks = []
    for objective in OBJECTIVES.values():
        own = key_names(objective.key_block)
        shared = tuple(name for name in objective.config_keys if name not in own)
        blocks.append(KeyBlock(f"{objective.title} (objective: {objective.name})", objective.key_block, shared))
    return blocks


#: Every key of the run config, by the part that owns it, in the order of docs/configuration.md.
KEY_BLOCKS: tuple[KeyBlock, ...] = (
    KeyBlock("Model", PipelineKeys),
    KeyBlock("Plain velocity models (model_factory; pretrained_model_name_or_path is then unused)", VelocityKeys),
    KeyBlock("Output, logging", OutputKeys),
    KeyBlock("Precision, memory", PrecisionKeys),
    KeyBlock("Policy: how the trained weights, the sampler and the reference are held", PolicyKeys),
    KeyBlock("LoRA (policy: lora)", LoRAKeys),
    KeyBlock("Optimisation", OptimizerKeys),
    KeyBlock("The objective", ObjectiveKeys),
    *_objective_blocks(),
    KeyBlock("Rollouts and optimisation (every objective)", RolloutKeys),
    KeyBlock("Prompts", PromptKeys),
    KeyBlock("Sizes", SizeKeys),
    KeyBlock("Reward", RewardKeys),
    KeyBlock("Held-out judges and the reward-hacking alarm (every objective)", JudgeKeys),
    KeyBlock("Long runs: checkpoints", CheckpointKeys),
    KeyBlock("Long runs: sample grids, validation renders, per-prompt logs", LogKeys),
    KeyBlock("Long runs: the Hub", HubKeys),
)


class RunConfigMethods:
    """What ``TrainConfig`` does besides holding its keys."""

    def __post_init__(self) -> None:
        # A shared key left null takes the chosen objective's default (an unknown objective is validate's error).
        chosen = OBJECTIVES.get(self.objective)
        for name, value in (chosen.key_defaults.items() if chosen else ()):
            if getattr(self, name) is None:
                setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compose(blocks: tuple[KeyBlock, ...]) -> type:
    """One flat dataclass with every block's keys, in order (a key declared twice is an error here)."""
    fields: list[tuple[str, Any, Any]] = []
    for block in blocks:
        hints = typing.get_type_hints(block.keys)  # resolved in the declaring module
        for f in dataclasses.fields(block.keys):
            fresh = field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
            fields.append((f.name, hints[f.name], fresh))
    composed = dataclasses.make_dataclass("TrainConfig", fields, bases=(RunConfigMethods,))
    composed.__module__ = __name__
    return composed


#: The run config: one flat dataclass of every part's keys (``cfg.w2_coefficient``, ``cfg.rank``, ...), as users
#: write it in YAML. ``TrainConfig(**kwargs)`` builds one; ``from_dict`` also checks the keys' names and types.
TrainConfig = compose(KEY_BLOCKS)
TrainConfig.__doc__ = "The run config: every key of KEY_BLOCKS, flat; see docs/configuration.md."


CFG_TRAININGS = ("guided", "conditional")
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


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a flat dict; unknown keys are an error that lists the known ones' nearest match.

    diffusers' names of ``overrides.ALIASES`` are read as ours."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}  # a key declared with path=True holds a local path
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {}
    for key, value in apply_aliases(values).items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}; see the configuration reference in docs/configuration.md")
        kwargs[key] = coerce(key, value, hints[key])
        if known[key].metadata["path"] and isinstance(kwargs[key], str):  # '~' and $VARIABLES, as a shell would
            kwargs[key] = os.path.expanduser(os.path.expandvars(kwargs[key]))
    from .objectives import check_objective_keys

    check_objective_keys(kwargs.get("objective", TrainConfig.objective), kwargs)
    return TrainConfig(**kwargs)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key value ...`` as a dict of keys to values (``overrides.read_overrides``: diffusers' syntax)."""
    return read_overrides(argv, typing.get_type_hints(TrainConfig))


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

    The loop's keys are checked here, every part's by its own ``validate_*`` (the objective's, the policy's, ...).
    ``model_given``: the trainer gets a plain velocity model object (``orw_diffusers.cfm``), so
    ``pretrained_model_name_or_path`` is not read and the velocity keys apply without ``model_factory``.
    """
    from .prompts import load_prompts
    from .sampling import SAMPLING_SOLVERS

    precision = resolved_mixed_precision(cfg)
    if precision not in MIXED_PRECISIONS:
        source = "" if cfg.mixed_precision is not None else " (ACCELERATE_MIXED_PRECISION, set by accelerate launch)"
        raise ConfigError(f"mixed_precision: {precision!r}{source} is not one of {', '.join(MIXED_PRECISIONS)}")
    validate_objective(cfg)
    check_choice("sampling_solver", cfg.sampling_solver, SAMPLING_SOLVERS)
    check_choice("report_to", cfg.report_to, report_to_choices())
    check_choice("cfg_training", cfg.cfg_training, CFG_TRAININGS)
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate: {cfg.learning_rate!r} must be > 0")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm: {cfg.max_grad_norm!r} must be >= 0 (0 disables clipping)")
    if cfg.lr_warmup_steps < 0:
        raise ConfigError(f"lr_warmup_steps: {cfg.lr_warmup_steps!r} must be >= 0")
    if cfg.guidance_scale < 1:
        raise ConfigError(f"guidance_scale: {cfg.guidance_scale!r} must be >= 1 (1 disables guidance)")
    check_positive(
        cfg, "num_epochs", "images_per_prompt", "sample_batch_size", "train_batch_size", "gradient_accumulation_steps",
        "sampler_update_interval", "num_sampling_steps", "num_inner_epochs", "resolution", "max_sequence_length",
    )  # fmt: skip
    validate_policy(cfg)
    validate_velocity_config(cfg, model_given)
    if cfg.model_factory is None and not model_given:  # a pipeline: the path names one, its family takes the precision
        from .digits.data import DIGITS_MODEL_NAME

        check_model_path(cfg.pretrained_model_name_or_path)
        if cfg.pretrained_model_name_or_path != DIGITS_MODEL_NAME:  # an SD3 pipeline: it runs every precision
            from .models import check_model_precision

            check_model_precision(cfg.pretrained_model_name_or_path, cfg.revision, precision)
    validate_reward_keys(cfg)  # names and weights; the models load later
    prompts = load_prompts(cfg)
    if cfg.prompts_per_round is not None and cfg.prompts_per_round <= 0:
        raise ConfigError(f"prompts_per_round: {cfg.prompts_per_round!r} must be a positive integer")
    validate_checkpoint_keys(cfg)
    _validate_logs(cfg)
    validate_hub_keys(cfg)
    validate_judges(cfg)
    return derive_sizes(cfg, num_prompts=len(prompts), num_processes=num_processes)


def report_to_choices() -> tuple[str, ...]:
    """``report_to``'s values: 'none', 'all' and every tracker Accelerate knows (``LOGGER_TYPE_TO_CLASS``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return ("none", "all", *LOGGER_TYPE_TO_CLASS)


def _validate_logs(cfg: TrainConfig) -> None:
    """Sample grids, per-prompt logs, the tracker's package and the validation renders."""
    check_off_or_count(cfg, "sample_log_interval", "per_prompt_log_max")
    # Trackers are optional packages: say which one is missing now, not after the model has loaded.
    # ('all' takes whichever are installed, as Accelerate does.)
    if cfg.report_to not in ("all", "none"):
        import accelerate.utils

        available = getattr(accelerate.utils, f"is_{cfg.report_to}_available", None)
        if available is not None and not available():
            raise ConfigError(
                f"report_to: {cfg.report_to!r} needs `pip install {cfg.report_to}` (or set report_to: none)"
            )
    check_positive(cfg, "validation_interval")
    if cfg.validation_prompts is not None:
        if not cfg.validation_prompts or not all(isinstance(p, str) and p.strip() for p in cfg.validation_prompts):
            raise ConfigError(f"validation_prompts: {cfg.validation_prompts!r} must be a non-empty list of prompts")


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
