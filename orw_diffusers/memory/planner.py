"""The plan: given a run config, the GPU bytes of every component in each phase of a round, and the fit.

``MemoryPlanner`` builds the pipeline's models on meta once (``trace``) and traces each phase's
activations. The transformer's shapes and call come from its family file (``memory_architectures``
in ``models/<family>.py``); the reward models' sizes from the reward registry
(``rewards.reward_gpu_memory``) or ``--reward_memory``.
The settings it reads and the plan it returns are in ``plan.py``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch

from ..dtypes import named_dtype
from ..errors import ConfigError
from ..models import FAMILIES, family_for
from ..models.base import Conditioning
from ..models.pipeline import PipelineFamily
from ..models.sd3 import JOINT_ATTENTION_TARGETS
from .configs import ModelConfigs
from ..policies import Policy
from .plan import DEFAULT_RUNTIME_OVERHEAD, PHASES, MemoryItem, MemoryPlan, PlanSettings
from .policy import attach_policy, policy_items
from .sizes import parse_size
from .trace import checkpoint_under_autocast, meta_diffusers_model, meta_text_encoder, num_parameters, parameter_bytes
from .trace import trace_peak

PROMPT_CACHE_BATCH = 8  # PromptCache encodes this many prompts per text-encoder call


# ------------------------------------------------------------------------------------------------
# What each transformer architecture takes (read from models/<family>.py)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How to call one transformer class with meta inputs shaped like the trainer's. The fields other
    than ``family`` are the family's ``memory_architectures`` entry (``models/<family>.py``)."""

    #: the family whose file describes this transformer (its dtypes decide the mixed-precision knob)
    family: type[PipelineFamily]
    #: per-sample shape of the model's latent input, from (transformer config, VAE scale, resolution)
    latent_shape: Callable[[dict, int, int], tuple[int, ...]]
    #: per-sample conditioning shapes, from (transformer config, text length)
    cond_shapes: Callable[[dict, int], dict[str, tuple[int, ...]]]
    #: text length of the conditioning, from (tokenizer max length, max_sequence_length)
    text_length: Callable[[int, int], int]
    #: v(model, x, sigma, cond, guidance_scale) as the family calls the model (its ``transformer_velocity``)
    velocity: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Conditioning, float], torch.Tensor]
    #: whether classifier-free guidance doubles the sampling batch (FLUX.1-dev embeds guidance instead)
    doubles_batch_for_guidance: bool
    #: whether T5 can be dropped (``load_t5: false``) and the context zero-filled
    t5_optional: bool


def _family_architectures() -> dict[str, Architecture]:
    """Transformer class -> Architecture, from every registered family (the first family naming a class wins)."""
    table: dict[str, Architecture] = {}
    for family in FAMILIES:
        for name, spec in getattr(family, "memory_architectures", {}).items():
            table.setdefault(name, Architecture(family, **spec))
    return table


# A read-only view built once from ``models.FAMILIES``: the shapes live in the family files, not here.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(_family_architectures())
# LoRA targets for a known transformer in a pipeline no family loads (so no family's defaults apply):
# SD3's and FLUX's joint blocks name their attention projections alike.
FALLBACK_LORA_TARGETS: tuple[str, ...] = JOINT_ATTENTION_TARGETS


def architecture(configs: ModelConfigs) -> Architecture:
    """The family-described architecture of ``configs``' transformer; an unknown class is a one-line error."""
    name = configs.transformer_class
    if name not in ARCHITECTURES:
        raise ConfigError(f"model {configs.source!r}: transformer {name!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# ------------------------------------------------------------------------------------------------
# Reward models (their sizes are declared in the reward registry, rewards/__init__.py)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModel:
    """A reward's model on the GPU: the registry's ``GPUMemory`` (activations: peak no-grad bytes per 224 px
    image in fp16), or a size given with ``--reward_memory``."""

    key: str  # rewards sharing a key share one loaded model (see rewards.common.load_once)
    description: str
    parameters: int
    activation_bytes_per_image: int
    #: set for a size given with ``--reward_memory``: all of its GPU bytes, as given (not scaled by reward_dtype)
    given_bytes: Optional[int] = None

    def weight_bytes(self, reward_dtype: str) -> int:
        """Bytes resident for the whole round: the given size, or the parameters in ``reward_dtype``."""
        if self.given_bytes is not None:
            return self.given_bytes
        return self.parameters * torch.finfo(named_dtype(reward_dtype)).bits // 8


# The CLI flag that sizes a reward this table lacks; the planner's errors and notes name it.
REWARD_MEMORY_FLAG = "--reward_memory"


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------


class MemoryPlanner:
    """Builds each model of one pipeline on meta once and caches the traced activations, so that
    ``plan`` can be called again and again (the knob search does) at little cost.

    Activations are linear in the batch size (every operator is batch-parallel; only the
    autocast copies of the weights are not), so each phase is traced at batch 1 and 2 and
    extrapolated; ``trace_peak`` at any other batch gives the same number.
    """

    #: what the plan calls the trained denoiser
    denoiser_name = "transformer"
    #: whether gradient checkpointing can be planned (a knob the advice may turn)
    can_checkpoint = True
    decode_name = "VAE decode"

    def __init__(self, configs: ModelConfigs):
        self.configs = configs
        self.arch = architecture(configs)
        vae_cfg = configs.components["vae"]
        self.vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
        self._models: dict[Any, torch.nn.Module] = {}
        self._traces: dict[Any, int] = {}
        # the LoRA targets the trainer would use: its family's defaults where the family exists
        self._attached: dict[Any, tuple[torch.nn.Module, Policy, list[torch.nn.Parameter]]] = {}
        try:
            family = family_for(configs.pipeline_class)
            self.default_lora_targets, self.default_policy = list(family.lora_target_modules), family.default_policy
        except ConfigError:
            self.default_lora_targets, self.default_policy = list(FALLBACK_LORA_TARGETS), "lora"

    # --- meta models --------------------------------------------------------------------------
    def _cached(self, key: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def lora_targets(self, s: PlanSettings) -> list[str]:
        return list(s.lora_target_modules or self.default_lora_targets)

    def attached(self, s: PlanSettings) -> tuple[torch.nn.Module, Policy, list[torch.nn.Parameter]]:
        """The transformer on meta with the run's policy attached by the policy itself (``memory/policy.py``), the
        policy, and its trained parameters."""
        key = ("transformer", s.weight_dtype, s.policy, s.rank, s.lora_alpha, tuple(self.lora_targets(s)))
        if key not in self._attached:
            model = self._build_denoiser(s)
            policy, params = attach_policy(model, s, self.lora_targets(s), self.default_policy)
            self._attached[key] = (model, policy, params)
        return self._attached[key]

    def _build_denoiser(self, s: PlanSettings) -> torch.nn.Module:
        return meta_diffusers_model(self.configs.components["transformer"], s.weight_dtype)

    def transformer(self, s: PlanSettings) -> torch.nn.Module:
        return self.attached(s)[0]

    def policy_name(self, s: PlanSettings) -> str:
        return s.policy or self.default_policy

    def vae(self, s: PlanSettings) -> Optional[torch.nn.Module]:
        return self._cached(
            ("vae", s.weight_dtype), lambda: meta_diffusers_model(self.configs.components["vae"], s.weight_dtype).eval()
        )

    def text_encoders(self, s: PlanSettings) -> dict[str, torch.nn.Module]:
        """The encoders the trainer loads (T5 only with ``load_t5`` where it is optional)."""
        out = {}
        for name, config in self.configs.text_encoders().items():
            is_t5 = (config.get("model_type") == "t5") or "T5" in str(config.get("architectures"))
            if is_t5 and self.arch.t5_optional and not s.load_t5:
                continue
            class_name = self.configs.model_index[name][1]
            out[name] = self._cached(
                (name, s.weight_dtype), lambda c=config, k=class_name: meta_text_encoder(c, s.weight_dtype, k)
            )
        return out

    # --- shapes ----------------------------------------------------------------------------------
    def latent_shape(self, s: PlanSettings) -> tuple[int, ...]:
        return self.arch.latent_shape(self.configs.components["transformer"], self.vae_scale, s.resolution)

    def image_pixels(self, s: PlanSettings) -> int:
        """Pixels of one decoded image (the rewards see it in float32 RGB)."""
        return s.resolution**2

    def text_length(self, s: PlanSettings) -> int:
        return self.arch.text_length(self.configs.tokenizer_max_length(), s.max_sequence_length)

    def cond_shapes(self, s: PlanSettings) -> dict[str, tuple[int, ...]]:
        return self.arch.cond_shapes(self.configs.components["transformer"], self.text_length(s))

    def _cond(self, s: PlanSettings, batch: int) -> dict[str, torch.Tensor]:
        return {
            k: torch.randn(batch, *shape, dtype=s.weight_dtype, device="meta")
            for k, shape in self.cond_shapes(s).items()
        }

    def _velocity(
        self, s: PlanSettings, model: torch.nn.Module, x: torch.Tensor, sigmas: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        return self.arch.velocity(model, x, sigmas, Conditioning(cond), s.guidance_scale)

    # --- traced phases ---------------------------------------------------------------------------
    def _linear(self, key: Any, batch: int, trace_at: Callable[[int], int]) -> int:
        for b in (1, 2):
            if (key, b) not in self._traces:
                self._traces[(key, b)] = trace_at(b)
        one, two = self._traces[(key, 1)], self._traces[(key, 2)]
        return one + (batch - 1) * (two - one)

    def _model_key(self, s: PlanSettings) -> tuple:
        targets = tuple(self.lora_targets(s))
        return (s.weight_dtype, s.policy, s.rank, s.lora_alpha, targets, s.resolution, s.max_sequence_length)

    def train_step_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of one training loss of a micro-batch, as ``Trainer.optimise`` runs it: the objective's
        forward passes in its order (``s.train_passes``), each output kept until the loss, then backward
        (gradients included). A loss per trained timestep runs its backward before the next: one loss is the peak."""
        from ..flow import guided_velocity, interpolate, target_velocity
        from ..loss import orw_cfm_w2_loss

        model, policy, _ = self.attached(s)
        guided = self.guided_training(s)
        modules = {"reference": policy.reference, "sampler": policy.sampler}  # the policy's own, as the trainer's

        def trace_at(b: int) -> int:
            def velocity(
                net: torch.nn.Module, x_t: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]
            ) -> torch.Tensor:
                if not guided:
                    return self._velocity(s, net, x_t, sigmas, cond)
                # both branches in one batch, gradients through both (Trainer.training_fields)
                v = self._velocity(s, net, torch.cat([x_t, x_t]), torch.cat([sigmas, sigmas]), cond)
                return guided_velocity(*v.chunk(2), s.guidance_scale)

            def step() -> None:
                latents = torch.randn(b, *self.latent_shape(s), dtype=s.weight_dtype, device="meta")
                noise = torch.randn_like(latents)
                sigmas = torch.rand(b, device="meta")
                x_t = interpolate(latents, noise, sigmas)
                v_target = target_velocity(latents, noise)
                cond = self._cond(s, 2 * b if guided else b)  # the micro-batch's rows, moved from the prompt cache
                outputs: dict[str, torch.Tensor] = {}
                for name in s.train_passes:  # the no-grad passes with the policy's modules for them
                    with modules[name](model) if name in modules else contextlib.nullcontext(model) as net:
                        outputs[name] = velocity(net, x_t, sigmas, cond)
                # a regression head on the outputs, as ORW's; the others' heads are a few latent-sized tensors too
                v_other = outputs.get("reference", outputs.get("sampler"))
                out = orw_cfm_w2_loss(outputs["policy"], v_target, v_other, torch.ones(b, device="meta"),
                                      float(v_other is not None))  # fmt: skip
                out.loss.backward()

            model.train()
            if s.gradient_checkpointing:
                model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_under_autocast)
            try:
                return trace_peak(step, s.autocast_dtype)
            finally:
                if s.gradient_checkpointing:
                    model.disable_gradient_checkpointing()
                for p in model.parameters():
                    p.grad = None

        key = ("train", self._model_key(s), s.gradient_checkpointing, s.train_passes, guided)
        return self._linear(key, batch or s.train_batch_size, trace_at)

    def guided_training(self, s: PlanSettings) -> bool:
        """Whether a training micro-batch runs the two guidance branches (``cfg_training: guided``)."""
        return s.guided_training and s.guidance_scale > 1 and self.arch.doubles_batch_for_guidance

    def sample_step_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of one Euler step of ``sample_ode`` with the sampler adapter (no grad)."""
        from ..flow import euler_step, guided_velocity

        model, policy, _ = self.attached(s)
        cfg = s.guidance_scale > 1 and self.arch.doubles_batch_for_guidance

        def trace_at(b: int) -> int:
            def step() -> torch.Tensor:
                latents = torch.randn(b, *self.latent_shape(s), dtype=s.weight_dtype, device="meta")
                cond = self._cond(s, b)
                if cfg:
                    uncond = self._cond(s, b)
                    cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                model_in = torch.cat([latents, latents]) if cfg else latents
                sigmas = torch.rand(model_in.shape[0], device="meta")
                with torch.no_grad(), policy.sampler(model) as net:
                    v = self._velocity(s, net, model_in, sigmas, cond)
                if cfg:
                    v = guided_velocity(*v.chunk(2), s.guidance_scale)
                return euler_step(latents, v, 1.0, 0.9)

            model.eval()
            return trace_peak(step, s.autocast_dtype)

        return self._linear(("sample", self._model_key(s), cfg), batch or s.sample_batch_size, trace_at)

    def decode_peak(self, s: PlanSettings, batch: Optional[int] = None) -> int:
        """Peak bytes of ``family.decode`` of a sampling batch (output images included)."""
        vae = self.vae(s)
        vae_cfg = self.configs.components["vae"]
        size = s.resolution // self.vae_scale

        def trace_at(b: int) -> int:
            def decode() -> torch.Tensor:
                latents = torch.randn(
                    b, vae_cfg.get("latent_channels", 4), size, size, dtype=s.weight_dtype, device="meta"
                )
                with torch.no_grad():
                    images = vae.decode(latents, return_dict=False)[0]
                return (images.float() / 2 + 0.5).clamp(0, 1)

            return trace_peak(decode, s.autocast_dtype)

        return self._linear(("decode", s.weight_dtype, s.resolution), batch or s.sample_batch_size, trace_at)

    def encode_peak(self, s: PlanSettings) -> int:
        """Peak bytes of one PromptCache batch through every text encoder (outputs kept, as
        ``encode_prompt`` keeps them until it concatenates)."""
        encoders = self.text_encoders(s)
        key = ("encode", s.weight_dtype, tuple(encoders), s.max_sequence_length)
        if key not in self._traces:

            def encode() -> list:
                outputs = []
                with torch.no_grad():
                    for encoder in encoders.values():
                        is_t5 = encoder.config.model_type == "t5"
                        length = s.max_sequence_length if is_t5 else self.configs.tokenizer_max_length()
                        ids = torch.zeros(PROMPT_CACHE_BATCH, length, dtype=torch.long, device="meta")
                        outputs.append(encoder(ids, output_hidden_states=not is_t5))
                return outputs

            self._traces[key] = trace_peak(encode, s.autocast_dtype) if encoders else 0
        return self._traces[key]

    # --- the plan --------------------------------------------------------------------------------
    def plan(self, s: PlanSettings, runtime_overhead: int = parse_size(DEFAULT_RUNTIME_OVERHEAD)) -> MemoryPlan:
        """Every component of GPU memory during a round, with the phases it is resident in."""
        all_round = ("sample", "decode", "reward", "train")
        items: list[MemoryItem] = []
        notes: list[str] = []
        # first, so that an unsized reward is an error before any model is built
        reward_models, reward_act = self.reward_models(s, notes)
        dt_bytes = torch.finfo(s.weight_dtype).bits // 8

        # the denoiser as the policy holds it: frozen weights, or trained weights and the policy's copies
        module, policy, params = self.attached(s)
        weights, training, grads = policy_items(module, policy, params, s, all_round, self.denoiser_name)
        items += weights
        vae = self.vae(s)
        if vae is not None:
            label = f"VAE ({num_parameters(vae) / 1e6:.0f} M params)"
            items.append(MemoryItem("frozen weights", label, parameter_bytes(vae), all_round))
        encoders = self.text_encoders(s)
        te_phases = ("encode",) + (all_round if not s.prompt_cache else ())
        for name, encoder in encoders.items():
            label = f"{name} {type(encoder).__name__} ({num_parameters(encoder) / 1e9:.2f} B params)"
            items.append(MemoryItem("frozen weights", label, parameter_bytes(encoder), te_phases))
        for rm in reward_models:
            dtype = "" if rm.given_bytes is not None else f" ({s.reward_dtype})"
            items.append(
                MemoryItem("frozen weights", f"reward: {rm.description}{dtype}", rm.weight_bytes(s.reward_dtype), all_round)
            )

        items += training  # LoRA: the two adapters; AdamW's two moments and the gradients of what is trained

        # the round's data kept on the GPU
        latent_numel = math.prod(self.latent_shape(s))
        trajectory = f" + {s.fp32_latents_per_sample} fp32 trajectory latents" if s.fp32_latents_per_sample else ""
        items.append(
            MemoryItem(
                "round data",
                f"round latents ({s.samples_per_process} samples x {s.latents_per_sample} latent{trajectory})",
                s.samples_per_process * latent_numel * (s.latents_per_sample * dt_bytes + s.fp32_latents_per_sample * 4),
                all_round,
            )
        )
        # The prompt embeddings are not round data: optimise takes each micro-batch's rows from the prompt
        # cache (on the CPU), and those are in the training trace below.

        # activations, traced
        train_peak = self.train_step_peak(s)
        ckpt = "with" if s.gradient_checkpointing else "without"
        items.append(
            MemoryItem(
                "activations",
                f"training micro-batch of {s.train_batch_size}"
                + (" (x2: the guided velocity trains both branches)" if self.guided_training(s) else "")
                + f" ({ckpt} gradient checkpointing)",
                max(train_peak - grads, 0),
                ("train",),
            )
        )
        guided = s.guidance_scale > 1 and self.arch.doubles_batch_for_guidance
        label = f"sampling batch of {s.sample_batch_size}" + (" (x2 for guidance)" if guided else "")
        items.append(MemoryItem("activations", label, self.sample_step_peak(s), ("sample",)))
        items.append(
            MemoryItem("activations", f"{self.decode_name} of {s.sample_batch_size} images", self.decode_peak(s),
                       ("decode",))
        )
        images = s.sample_batch_size * 3 * self.image_pixels(s) * 4
        items.append(MemoryItem("activations", "reward model (+ the decoded images)", reward_act + images, ("reward",)))
        if encoders:
            items.append(
                MemoryItem(
                    "activations", f"text encoders ({PROMPT_CACHE_BATCH} prompts)", self.encode_peak(s), ("encode",)
                )
            )
        items.append(
            MemoryItem("runtime", "CUDA context, workspaces, allocator slack (assumed)", runtime_overhead, PHASES)
        )
        if not s.prompt_cache:
            notes.append("without the prompt cache the text encoders stay on the GPU for the whole run")
        policy_text = f"LoRA rank {s.rank}" if self.policy_name(s) == "lora" else f"policy {self.policy_name(s)}"
        return MemoryPlan(s, items, notes, policy_text)

    def reward_models(self, s: PlanSettings, notes: Optional[list[str]] = None) -> tuple[list[RewardModel], int]:
        """The reward models on the GPU (one per shared key) and their activations for one reward batch.

        A reward that neither the reward registry nor ``--reward_memory`` sizes is a ``ConfigError``: counting
        it as 0 bytes would call a plan fitting that may not fit.
        """
        if not s.reward_on_gpu:
            return [], 0
        given = dict(s.reward_memory)
        models: dict[str, RewardModel] = {}
        for name in s.rewards:
            rm: Optional[RewardModel]
            if name in given:  # the user's size wins over the registry's (e.g. a larger checkpoint via kwargs)
                nbytes = given[name]
                rm = RewardModel(f"given:{name}", f"{name} ({REWARD_MEMORY_FLAG})", 0, 0, nbytes) if nbytes else None
            elif ":" in name:
                if notes is not None:
                    notes.append(
                        f"reward {name!r} is user code: its GPU memory is not counted "
                        f"(give it with {REWARD_MEMORY_FLAG} {name}=SIZE)"
                    )
                continue
            else:
                rm = _registered(name)  # None: the reward uses no GPU memory
            if rm is not None:
                models.setdefault(rm.key, rm)
        scale = (torch.finfo(named_dtype(s.reward_dtype)).bits // 8) / 2  # the table is for fp16
        per_batch = min(s.sample_batch_size, s.reward_batch_size)
        act = int(sum(rm.activation_bytes_per_image for rm in models.values()) * per_batch * scale)
        return list(models.values()), act


def _registered(name: str) -> Optional[RewardModel]:
    """The reward registry's GPU memory of ``name``; a reward it has no size for is a one-line ``ConfigError``."""
    from ..rewards import reward_gpu_memory

    try:
        memory = reward_gpu_memory(name)
    except LookupError:
        raise ConfigError(
            f"reward {name!r}: the memory planner does not know its GPU memory; give it with "
            f"{REWARD_MEMORY_FLAG} {name}=SIZE (e.g. {name}=1.5GiB, or {name}=0 if it uses no GPU)"
        ) from None
    if memory is None:
        return None
    return RewardModel(memory.key, memory.description, memory.parameters, memory.activation_bytes_per_image)
