"""``python -m orw_diffusers.memory``: the arguments, and the plan printed as a table."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any, Optional, Sequence

from ..dtypes import precision_dtype
from ..errors import ConfigError
from .advice import Advice, advise, largest_batch_sizes
from .configs import load_model_configs
from .plan import DEFAULT_RUNTIME_OVERHEAD, PHASE_HELP, PHASES, MemoryPlan, PlanSettings
from .planner import REWARD_MEMORY_FLAG, MemoryPlanner
from .sizes import gib, parse_size

# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def format_plan(plan: MemoryPlan, budget: Optional[int] = None, advice: Optional[Advice] = None) -> str:
    s = plan.settings
    precision = {"no": "fp32", "fp16": "fp16 (autocast)", "bf16": "bf16 (autocast)"}[s.mixed_precision]
    lines = [
        f"Memory plan for {s.model} at {s.resolution} px, {precision}, {plan.policy or f'LoRA rank {s.rank}'}, "
        f"train_batch_size {s.train_batch_size}, sample_batch_size {s.sample_batch_size}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
        f"prompt cache {'on' if s.prompt_cache else 'off'}, T5 {'on' if s.load_t5 else 'off'}, "
        f"{s.num_processes} process(es)",
        "",
        f"{'GiB':>7}  {'group':<15} {'component':<64} resident in",
    ]
    for item in plan.items:
        phases = "all" if item.phases == PHASES else " ".join(item.phases)
        lines.append(f"{gib(item.bytes):>7}  {item.group:<15} {item.name:<64} {phases}")
    lines.append("")
    totals = "  ".join(f"{p} {gib(plan.phase_total(p))}" for p in PHASES)
    lines.append(f"per phase (GiB): {totals}")
    lines.append(f"peak: {gib(plan.peak)} GiB in phase '{plan.peak_phase}' ({PHASE_HELP[plan.peak_phase]})")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if budget is not None:
        if plan.fits(budget):
            lines.append(f"fits in {gib(budget)} GiB ({gib(budget - plan.peak)} GiB to spare)")
        else:
            lines.append(f"does NOT fit in {gib(budget)} GiB ({gib(plan.peak - budget)} GiB over)")
            if advice is not None and advice.first_knob:
                if len(advice.steps) == 1 and advice.final_fits:
                    lines.append(f"first knob: {advice.first_knob} -> peak {gib(advice.steps[0][1])} GiB")
                else:
                    lines.append(f"first knob: {advice.first_knob}; not enough alone, then:")
                    for name, peak in advice.steps:
                        lines.append(f"  - {name} -> peak {gib(peak)} GiB")
                    if not advice.final_fits:
                        lines.append("  still over: a larger GPU, a lower resolution or fewer LoRA targets are needed")
            elif advice is not None:
                lines.append("no knob helps: the frozen weights alone need a larger GPU")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def parse_reward_memory(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``--reward_memory NAME=SIZE`` values -> ((name, bytes), ...). The last '=' splits, so that a
    ``module:function`` name may hold one."""
    out: dict[str, int] = {}
    for text in values:
        name, sep, size = text.rpartition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{REWARD_MEMORY_FLAG} {text!r}: expected NAME=SIZE, e.g. my_reward=1.5GiB")
        out[name.strip()] = parse_size(size)
    return tuple(out.items())


def planned_model_path(path: str) -> str:
    """The digits name plans its cached base (never built here: the build takes minutes); other paths as given."""
    from ..digits.data import BASE_NAME, DIGITS_MODEL_NAME, digits_cache_dir

    if path != DIGITS_MODEL_NAME:
        return path
    cached = os.path.join(digits_cache_dir(), BASE_NAME)
    if not os.path.isfile(os.path.join(cached, "model_index.json")):
        raise ConfigError(
            f"pretrained_model_name_or_path: {path!r} is not built yet; build it once with `python -m orw_diffusers.demo` "
            f"(or a training run with it), then plan"
        )
    return cached


def make_planner(cfg: Any) -> MemoryPlanner:
    """The planner of a run config: its pipeline's configs, or its plain velocity model (``model_factory``)."""
    if cfg.model_factory:
        from .velocity import VelocityPlanner

        return VelocityPlanner.from_config(cfg)
    return MemoryPlanner(load_model_configs(planned_model_path(cfg.pretrained_model_name_or_path)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..config import from_dict, load_yaml, parse_overrides

    parser = argparse.ArgumentParser(
        prog="python -m orw_diffusers.memory",
        description="GPU memory plan of a run config; downloads nothing. "
        "Any run-config key can be overridden with --key value.",
        # no prefix matching: the run key --reward would otherwise be taken for --reward_memory
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, help="YAML run config (as for train_orw_cfm_w2.py)")
    parser.add_argument("--gpu_memory", default=None, help="GPU memory to fit, e.g. 24GiB, 24GB or 23028MiB")
    parser.add_argument(
        "--num_processes", type=int, default=1, help="processes (GPUs) of the run; sets the round split"
    )
    parser.add_argument("--no_prompt_cache", action="store_true", help="plan as if the text encoders stayed on the GPU")
    parser.add_argument("--runtime_overhead", default=DEFAULT_RUNTIME_OVERHEAD, help="CUDA context + allocator slack")
    parser.add_argument(
        "--find_batch_sizes", action="store_true", help="also print the largest train/sample batch sizes that fit"
    )
    parser.add_argument(
        REWARD_MEMORY_FLAG,
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="GPU memory of a reward the planner has no size for (weights and activations, e.g. "
        "my_reward=1.5GiB; 0 for none); repeat for several rewards",
    )
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        values = load_yaml(args.config) if args.config else {}
        values.update(parse_overrides(rest))
        cfg = from_dict(values)
        settings = PlanSettings.from_train_config(cfg, args.num_processes, prompt_cache=not args.no_prompt_cache)
        settings = replace(settings, reward_memory=parse_reward_memory(args.reward_memory))
        precision_dtype(settings.mixed_precision)  # the config's, else Accelerate's: one line if unknown
        budget = parse_size(args.gpu_memory) if args.gpu_memory else None
        overhead = parse_size(args.runtime_overhead)
        planner = make_planner(cfg)
        if settings.gradient_checkpointing and not planner.can_checkpoint:
            raise ConfigError("gradient_checkpointing: the memory planner does not plan this model's own "
                              "checkpointing; plan without it")  # fmt: skip
        planner.reward_models(settings)  # an unsized reward is an error here, before any tracing
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = planner.plan(settings, overhead)
    advice = advise(planner, settings, budget, overhead) if budget is not None else None
    print(format_plan(plan, budget, advice))
    if args.find_batch_sizes:
        if budget is None:
            print("error: --find_batch_sizes needs --gpu_memory", file=sys.stderr)
            return 2
        train_max, sample_max = largest_batch_sizes(planner, settings, budget, overhead)
        print(
            f"largest batch sizes that fit {gib(budget)} GiB (the other as configured): "
            f"train_batch_size {train_max}, sample_batch_size {sample_max}"
        )
    return 0
