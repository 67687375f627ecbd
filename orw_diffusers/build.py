"""The run's parts, built from its config: the accelerator, the weight dtype, the model, the
optimizer and its schedule, the reward, and the scale of the trained guidance."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import torch

from .config import TrainConfig, resolve_model_path
from .dtypes import named_dtype, precision_dtype
from .judges import Judges
from .models import FlowModel, LoadOptions, load_family
from .rewards import build_reward

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig, cpu: Optional[bool] = None) -> Any:
    """``cpu``: force the CPU (True) or not; default: the CPU when there is no CUDA device.

    ``mixed_precision`` null is not passed on, so Accelerate takes its own (``accelerate launch
    --mixed_precision``, its config file, ``ACCELERATE_MIXED_PRECISION``), as diffusers' scripts do.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=cfg.mixed_precision,  # None: Accelerate's
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "logs")),
        cpu=not torch.cuda.is_available() if cpu is None else cpu,
    )


def resolve_precision(cfg: TrainConfig, accelerator: Any) -> tuple[TrainConfig, torch.dtype]:
    """(``cfg`` with ``mixed_precision`` = the accelerator's, the frozen weights' dtype), and a log line saying so.

    The accelerator's value is the run's: the config's when it names one, else Accelerate's. The returned
    config is what ``output_dir/config.yaml`` and the checkpoints record.
    """
    precision = accelerator.mixed_precision
    if cfg.mixed_precision is None:
        source = "Accelerate's: accelerate launch --mixed_precision, its config file or ACCELERATE_MIXED_PRECISION"
    elif cfg.mixed_precision == precision:
        source = "the run config's"
    else:  # an accelerator passed in, made for another precision
        source = f"the accelerator's; the run config's {cfg.mixed_precision!r} is ignored"
        logger.warning("mixed_precision: the accelerator runs %s, not the run config's %s", precision,
                       cfg.mixed_precision)
    dtype = weight_dtype(precision, accelerator.device)
    logger.info("mixed_precision: %s (%s); frozen weights in %s, trained parameters in float32",
                precision, source, dtype)
    return dataclasses.replace(cfg, mixed_precision=precision), dtype


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype for the accelerator's ``mixed_precision`` (trainable LoRA parameters stay fp32)."""
    dtype = precision_dtype(mixed_precision)
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("fp16 weights are not supported on CPU; using float32 (bf16 works on CPU)")
        return torch.float32
    return dtype


def load_model(cfg: TrainConfig, dtype: torch.dtype) -> FlowModel:
    """The pipeline of ``pretrained_model_name_or_path`` (``resolve_model_path``: the digits name is built or
    read from the cache), on CPU in ``dtype``; or, with ``model_factory``, the plain velocity model it builds
    (fp32: its trained weights are the model's own)."""
    if cfg.model_factory:
        from .models.velocity import build_velocity_model

        return build_velocity_model(cfg)
    path = resolve_model_path(cfg.pretrained_model_name_or_path)
    options = LoadOptions(path, cfg.revision, cfg.variant, cfg.load_t5, cfg.max_sequence_length)
    return load_family(options, dtype)


def training_guidance(cfg: TrainConfig, sampling_scale: float, warn: bool) -> float:
    """The CFG scale of the trained field: the sampler's (``cfg_training: guided``) or 1 (the conditional branch)."""
    if cfg.cfg_training == "guided":
        return sampling_scale
    if sampling_scale > 1 and warn:
        logger.warning(
            "cfg_training: conditional with guidance_scale %g: the loss fits and regularises v_c while the "
            "rollouts integrate v_u + g (v_c - v_u), so w2_loss does not bound the sampled distribution and "
            "the change can run away; cfg_training: guided trains the sampled field",
            sampling_scale,
        )
    return 1.0


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], num_processes: int) -> tuple[Any, Any]:
    """AdamW and a linear warmup to a constant learning rate: a fresh optimizer and schedule for every run."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )  # fmt: skip
    # Accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps * num_processes)
    return optimizer, scheduler


def make_reward(cfg: TrainConfig, device: torch.device, spec: Any = None) -> Callable:
    """The reward of ``spec`` (default: ``cfg.reward``) on ``reward_device`` (default: ``device``)."""
    reward_device = torch.device(cfg.reward_device) if cfg.reward_device else device
    spec = cfg.reward if spec is None else spec
    return build_reward(spec, reward_device, dtype=named_dtype(cfg.reward_dtype), batch_size=cfg.reward_batch_size)


def make_judges(cfg: TrainConfig, device: torch.device) -> Judges:
    """The held-out judges of ``eval_reward`` (none when it is null), placed as the training reward is."""
    return Judges(cfg, None if cfg.eval_reward is None else make_reward(cfg, device, cfg.eval_reward))
