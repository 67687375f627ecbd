"""What a memory plan takes and gives: the run-config values that decide GPU memory (``PlanSettings``),
the phases of a round, and the plan itself (``MemoryPlan``: every component's bytes and the phases it is
resident in). ``planner.py`` measures the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import TrainConfig
from ..dtypes import precision_dtype

PHASES = ("encode", "sample", "decode", "reward", "train")
PHASE_HELP = {
    "encode": "fill the prompt cache (text encoders on the GPU, nothing else yet)",
    "sample": "one Euler step of the sampling batch (no grad; x2 batch with classifier-free guidance)",
    "decode": "VAE decode of the sampling batch",
    "reward": "reward model on the decoded images",
    "train": "one training loss of a micro-batch: the objective's forward passes, in its order, + backward",
}
# CUDA context, cuBLAS workspaces and caching-allocator slack: an assumption, not a measurement
# (this planner was validated on CPU); override with --runtime_overhead.
DEFAULT_RUNTIME_OVERHEAD = "0.75GiB"


@dataclass(frozen=True)
class PlanSettings:
    """The run-config values that decide GPU memory (see ``from_train_config``)."""

    model: str
    resolution: int = 512
    train_batch_size: int = 2
    sample_batch_size: int = 4
    samples_per_process: int = 16
    #: the policy seam's name (``policy`` key; None: the model's default, LoRA for a pipeline)
    policy: Optional[str] = None
    rank: int = 32
    lora_alpha: Optional[float] = None
    lora_target_modules: Optional[tuple[str, ...]] = None
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    prompt_cache: bool = True
    load_t5: bool = True
    max_sequence_length: int = 256
    guidance_scale: float = 4.5
    #: ``cfg_training: guided``: the training pass runs both guidance branches (a doubled batch)
    guided_training: bool = True
    #: the forward passes of one training loss, in the objective's order (``step.train_step_passes``): "policy"
    #: (with grad), "reference" and "sampler" (DiffusionNFT's old policy), both no grad
    train_passes: tuple[str, ...] = ("reference", "policy")
    #: latent-sized tensors the objective's rollout keeps per sample: x1 in the weight dtype, and trajectory
    #: latents in float32 (Flow-GRPO: both sides of each trained step)
    latents_per_sample: int = 1
    fp32_latents_per_sample: int = 0
    rewards: tuple[str, ...] = ("clip_score",)
    reward_on_gpu: bool = True
    reward_dtype: str = "float32"
    reward_batch_size: int = 32
    num_processes: int = 1
    #: (reward name, GPU bytes) from ``--reward_memory``, for rewards the registry has no size for
    #: (or to override it);
    #: a tuple, not a dict, so that the settings stay hashable
    reward_memory: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, num_processes: int = 1, prompt_cache: bool = True) -> "PlanSettings":
        from ..config import derive_sizes, resolved_mixed_precision
        from ..objectives import build_objective
        from ..rewards import parse_reward_spec
        from .step import train_step_passes

        objective = build_objective(cfg)

        if cfg.prompts_per_round:
            num_prompts = cfg.prompts_per_round
        else:
            from ..prompts import load_prompts

            num_prompts = len(load_prompts(cfg))
        sizes = derive_sizes(cfg, num_prompts, num_processes)
        return cls(
            model=cfg.model_factory or cfg.pretrained_model_name_or_path,
            resolution=cfg.resolution,
            train_batch_size=cfg.train_batch_size,
            sample_batch_size=cfg.sample_batch_size,
            samples_per_process=sizes.samples_per_process,
            policy=cfg.policy,
            rank=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_target_modules=tuple(cfg.lora_target_modules) if cfg.lora_target_modules else None,
            mixed_precision=resolved_mixed_precision(cfg),  # the config's, else Accelerate's (launch flag, env)
            gradient_checkpointing=cfg.gradient_checkpointing,
            prompt_cache=prompt_cache,
            load_t5=cfg.load_t5,
            max_sequence_length=cfg.max_sequence_length,
            guidance_scale=cfg.guidance_scale,
            guided_training=cfg.cfg_training == "guided",
            train_passes=train_step_passes(objective, cfg),
            latents_per_sample=objective.round_latents()[0],
            fp32_latents_per_sample=objective.round_latents()[1],
            # the held-out judges (eval_reward) are loaded beside the reward, on the same device
            rewards=tuple(spec.name for spec in parse_reward_spec(cfg.reward))
            + (tuple(spec.name for spec in parse_reward_spec(cfg.eval_reward)) if cfg.eval_reward is not None else ()),
            reward_on_gpu=not (cfg.reward_device or "").startswith("cpu"),
            reward_dtype=cfg.reward_dtype,
            reward_batch_size=cfg.reward_batch_size,
            num_processes=num_processes,
        )

    @property
    def reference_pass(self) -> bool:
        return "reference" in self.train_passes

    @property
    def sampler_pass(self) -> bool:
        return "sampler" in self.train_passes

    @property
    def weight_dtype(self) -> torch.dtype:
        return precision_dtype(self.mixed_precision)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return None if self.mixed_precision == "no" else self.weight_dtype


@dataclass(frozen=True)
class MemoryItem:
    """One component of GPU memory and the phases of a round during which it is resident."""

    group: str  # "frozen weights", "LoRA", "activations", "round data", "runtime"
    name: str
    bytes: int
    phases: tuple[str, ...]


@dataclass
class MemoryPlan:
    settings: PlanSettings
    items: list[MemoryItem]
    notes: list[str] = field(default_factory=list)
    #: how the denoiser is trained, for the plan's header: "LoRA rank 32", "policy full"
    policy: str = ""

    def phase_total(self, phase: str) -> int:
        return sum(item.bytes for item in self.items if phase in item.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    def peak_items(self) -> list[MemoryItem]:
        """The items resident in the peak phase; their bytes add up to ``peak``."""
        return [item for item in self.items if self.peak_phase in item.phases]

    def item(self, name: str) -> MemoryItem:
        return next(i for i in self.items if i.name == name)

    def fits(self, budget: int) -> bool:
        return self.peak <= budget
