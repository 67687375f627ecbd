"""What the run's policy holds, asked of the policy itself: it is attached to the meta denoiser with its own
``attach`` (``policies.build_policy``), its sampler and reference modules are the ones its contexts yield, and the
memory items follow from what it returned. LoRA: the frozen denoiser in the weight dtype, two fp32 adapters, AdamW
and gradients for the trained one. Full fine-tuning: every weight trained in fp32, plus the reference and the
sampler copies.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from ..policies import Policy, build_policy
from .plan import MemoryItem, PlanSettings

#: LoRA's adapter parameters carry this in their names (peft); both adapters are listed as one item
ADAPTER_MARK = "lora_"


def attach_policy(
    module: torch.nn.Module, s: PlanSettings, lora_targets: list[str], default_policy: str
) -> tuple[Policy, list[torch.nn.Parameter]]:
    """The run's policy (``s.policy``, else ``default_policy``) attached to the meta ``module``, and the parameters
    it trains."""
    cfg = SimpleNamespace(policy=s.policy, rank=s.rank, lora_alpha=s.lora_alpha, lora_target_modules=lora_targets)
    policy = build_policy(cfg, SimpleNamespace(lora_target_modules=lora_targets, default_policy=default_policy))
    with torch.device("meta"):  # peft creates the adapter layers on the current device
        params = policy.attach(module)
    return policy, params


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies(policy: Policy, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules the policy keeps besides ``module`` for its sampler and its reference (none for LoRA)."""
    out = {}
    for name, context in (("reference", policy.reference), ("sampler", policy.sampler)):
        with context(module) as net:
            if net is not module:
                out[name] = net
    return out


def policy_items(
    module: torch.nn.Module, policy: Policy, params: list[torch.nn.Parameter], s: PlanSettings, phases: tuple[str, ...],
    name: str = "transformer",
) -> tuple[list[MemoryItem], list[MemoryItem], int]:  # fmt: skip
    """The policy's items on ``module``, resident in ``phases`` (gradients: in training only): (its weights, its
    trained parameters' adapters, optimizer state and gradients), and the gradients' bytes (the training trace
    includes them)."""
    trained = {id(p) for p in params}
    named = list(module.named_parameters())
    base = [p for n, p in named if ADAPTER_MARK not in n]
    adapters = [p for n, p in named if ADAPTER_MARK in n]
    # buffers count too: SD3's position-embedding table is 384^2 x 1536 values in SD3.5-Medium
    base_bytes, count = _bytes(base) + _bytes(list(module.buffers())), sum(p.numel() for p in base)
    weights, training = [], []
    if any(id(p) in trained for p in base):  # every weight is trained
        group = "full fine-tuning"
        weights.append(MemoryItem(group, f"{name}: trained weights ({count / 1e9:.2f} B params + buffers)", base_bytes,
                                  phases))  # fmt: skip
        for role, copy in copies(policy, module).items():
            nbytes = _bytes(list(copy.parameters())) + _bytes(list(copy.buffers()))
            weights.append(MemoryItem("frozen weights", f"{name}: the policy's {role} copy", nbytes, phases))
    else:
        group = "LoRA"
        label = f"{name} ({count / 1e9:.2f} B params + buffers)"
        weights.append(MemoryItem("frozen weights", label, base_bytes, phases))
        both = sum(p.numel() for p in adapters)
        training.append(MemoryItem(group, f"adapters: trained + sampler ({both / 1e6:.1f} M params, fp32)",
                                   _bytes(adapters), phases))  # fmt: skip
    grads = _bytes(params)
    dtype = _dtype_name(params)
    training.append(MemoryItem(group, f"AdamW state (2 moments, {dtype})", 2 * grads, phases))
    training.append(MemoryItem(group, f"gradients ({dtype})", grads, ("train",)))
    if s.num_processes > 1:
        training.append(MemoryItem(group, "DDP gradient buckets", grads, phases))
    return weights, training, grads


def _dtype_name(params: list[torch.nn.Parameter]) -> str:
    dtypes = {p.dtype for p in params}
    return "fp32" if dtypes == {torch.float32} else ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
