"""GPU memory planner: does a run config fit on a GPU, and which knob to turn first if not.

    python -m orw_diffusers.memory --config run.yaml [--gpu_memory 24GiB] [--key value ...]

Nothing is downloaded. The model's real architecture is built from its configs on the ``meta``
device (shapes only: no weights, no compute), with the run's policy attached by the policy itself
(LoRA's two adapters, or full fine-tuning's copies). The activation memory of each phase of a round is then *measured*, not
guessed: the phase's real forward (and backward) passes run on meta tensors while ``trace_peak``
counts the bytes of every tensor alive after each operator.

- ``configs``: the pipeline's configs (shipped public ones or a local diffusers directory);
- ``trace``: models on meta and the byte counting (fused attention, CUDA autocast emulation);
- ``plan``: the settings a plan reads (``PlanSettings``), the phases, the plan (``MemoryPlan``);
- ``planner``: the bytes of every component per phase, the transformer's shapes read from its
  family file (``memory_architectures`` in ``models/<family>.py``), the reward models' sizes (declared in the reward registry);
- ``step``: the forward passes of the objective's training loss, asked of the objective;
- ``policy``: the policy attached on meta and what it holds (weights, copies, optimizer state, gradients);
- ``velocity``: the plan of a plain velocity model (``model_factory``);
- ``advice``: the first knob to turn, the largest batch sizes that fit;
- ``cli``: the arguments and the printed table; ``sizes``: '24GiB' and friends.

``docs/memory.md`` describes the phases, the assumptions and how the activation model was
validated against measured memory.
"""

from .advice import Advice, advise, knob_candidates, largest_batch_sizes
from .cli import format_plan, main, parse_reward_memory
from .configs import MODEL_CONFIG_DIR, SHIPPED_MODELS, ModelConfigs, load_model_configs
from .plan import DEFAULT_RUNTIME_OVERHEAD, PHASE_HELP, PHASES, MemoryItem, MemoryPlan
from .plan import PlanSettings
from .planner import (
    ARCHITECTURES,
    FALLBACK_LORA_TARGETS,
    PROMPT_CACHE_BATCH,
    REWARD_MEMORY_FLAG,
    Architecture,
    MemoryPlanner,
    RewardModel,
    architecture,
)
from .sizes import GiB, gib, parse_size
from .trace import (
    checkpoint_under_autocast,
    meta_diffusers_model,
    meta_text_encoder,
    num_parameters,
    parameter_bytes,
    trace_peak,
)

__all__ = [
    "ARCHITECTURES", "DEFAULT_RUNTIME_OVERHEAD", "FALLBACK_LORA_TARGETS", "GiB", "MODEL_CONFIG_DIR", "PHASES",
    "PHASE_HELP", "PROMPT_CACHE_BATCH", "REWARD_MEMORY_FLAG", "SHIPPED_MODELS",
    "Advice", "Architecture", "MemoryItem", "MemoryPlan", "MemoryPlanner", "ModelConfigs",
    "PlanSettings", "RewardModel", "advise", "architecture", "checkpoint_under_autocast", "format_plan", "gib",
    "knob_candidates", "largest_batch_sizes", "load_model_configs", "main", "meta_diffusers_model",
    "meta_text_encoder", "num_parameters", "parameter_bytes", "parse_reward_memory", "parse_size", "trace_peak",
]  # fmt: skip
