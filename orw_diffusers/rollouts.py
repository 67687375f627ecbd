"""Phases 1 and 2 of a round: sample with the sampler policy (the objective's rollout over the guided
field) and score with the reward, batch by batch; and the validation renders: the sampler's ODE from fixed
noise, scored by the reward and the held-out judges, before training, every ``validation_interval`` rounds
and after the last."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from . import streams
from .flow import per_sample_noise
from .objectives import RolloutRecord
from .progress import progress_bar
from .rewards import RewardOutput, clean_scores
from .sampling import VelocityField, guided_field, integrate

if TYPE_CHECKING:
    from .config import TrainConfig
    from .judges import Judges
    from .models import FlowModel
    from .objectives import Objective
    from .policies import Policy
    from .run_log import RunLog


@dataclass
class Rollout:
    """One round's samples on this process (local rows; ``indices`` are global sample indices)."""

    latents: torch.Tensor  # [n, *latent_shape], clean x1, on the training device
    extras: dict[str, torch.Tensor]  # what the objective recorded, name -> [n, ...]
    prompts: list[str]  # [n]
    indices: torch.Tensor  # [n] long, global sample index
    rewards: torch.Tensor  # [n] float32 CPU
    components: dict[str, torch.Tensor]  # name -> [n]
    num_nonfinite: int
    images: torch.Tensor  # [min(n, keep_images), 3, H, W] float32 CPU, for logging
    embeddings: Optional[torch.Tensor] = None  # [n, D] from the reward's ``embed``, if it has one
    held_out: dict[str, torch.Tensor] = field(default_factory=dict)  # eval_reward's scores, name -> [n]


def micro_batch_rows(
    num_local: int, batch_size: int, keep: Optional[torch.Tensor] = None, process_index: int = 0, num_processes: int = 1
) -> list[torch.Tensor]:
    """This process's micro-batches: lists of local rows [<= batch_size] of the round's ``num_local`` samples.

    ``keep`` [B] bool over the global batch (None: every sample): samples outside it are dropped before batching.
    Local row j is global sample ``process_index + j * num_processes``. Every process gets the same number of
    micro-batches, so that DDP's gradient reductions pair up: the most any process keeps, in ``batch_size``s. A
    process that keeps fewer gets a short one, or one masked row in a micro-batch where it has none left (its
    objective weighs it 0). Nothing kept anywhere: no micro-batch.
    """
    if keep is None:
        return [torch.arange(start, min(start + batch_size, num_local)) for start in range(0, num_local, batch_size)]
    per_process = keep.reshape(-1, num_processes)  # [num_local, P]: column p is process p's rows
    count = int(per_process.sum(dim=0).max())
    kept, dropped = per_process[:, process_index].nonzero()[:, 0], (~per_process[:, process_index]).nonzero()[:, 0]
    batches = []
    for start in range(0, count, batch_size):
        rows = kept[start : start + batch_size]
        batches.append(rows if len(rows) else dropped[:1])
    return batches


@dataclass(eq=False, repr=False)
class Rollouts:
    """The sampling side of a round: the objective's rollouts with the policy's sampler, scored by the reward
    and the held-out judges; and the validation renders. Holds what it uses, no trainer."""

    cfg: TrainConfig  # seed, sampling_solver, sample_batch_size, validation_interval, num_epochs
    accelerator: Any  # device, autocast, is_main_process
    family: FlowModel
    module: torch.nn.Module  # the denoiser, unwrapped: the policy's sampler runs it
    policy: Policy
    objective: Objective
    reward_fn: Callable[[torch.Tensor, list[str]], Any]
    judges: Judges
    log: RunLog  # the validation grids and their metrics
    guidance_scale: float  # the sampler's true-CFG scale (1 for a guidance-distilled family)
    latent_shape: tuple[int, ...]
    sigmas: torch.Tensor  # the sampling schedule [num_sampling_steps + 1]
    weight_dtype: torch.dtype
    validation_prompts: list[str]
    embed_fn: Optional[Callable[[torch.Tensor], Any]] = field(init=False)  # the reward's ``embed``, if it has one

    def __post_init__(self) -> None:
        self.embed_fn = getattr(self.reward_fn, "embed", None)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @contextlib.contextmanager
    def sampler_field(self, prompts: list[str]) -> Iterator[VelocityField]:
        """The field the sampler integrates for ``prompts`` (CFG as the family samples), no grad."""
        family, n = self.family, len(prompts)
        cond = family.conditioning(prompts, self.device)
        uncond = family.negative_conditioning(n, self.device)
        module = self.module
        module.eval()
        with self.policy.sampler(module) as net:
            yield guided_field(family, net, cond, uncond, self.guidance_scale, self.accelerator.autocast)

    def record(self, prompts: list[str], indices: torch.Tensor, round_idx: int) -> RolloutRecord:
        """The objective's rollout of each (prompt, global index) with the sampler: x1 [n, *latent_shape] and extras."""
        noise = per_sample_noise(self.latent_shape, self.cfg.seed, (round_idx, streams.SAMPLING_NOISE), indices)
        noise = noise.to(self.device, self.weight_dtype)
        with self.sampler_field(prompts) as field_fn:
            return self.objective.rollout(
                field_fn, noise, self.sigmas, self.cfg.sampling_solver, indices, round_idx
            )

    @torch.no_grad()
    def from_noise(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """The sampler's ODE from ``noise`` [n, *latent_shape] to x1 (validation renders)."""
        noise = noise.to(self.device, self.weight_dtype)
        with self.sampler_field(prompts) as field_fn:
            return integrate(field_fn, noise, self.sigmas, self.cfg.sampling_solver)

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        out = self.reward_fn(images, prompts)
        if isinstance(out, RewardOutput):
            return out
        scores, bad = clean_scores(torch.as_tensor(out).detach().float().cpu().reshape(-1), "reward")
        return RewardOutput(scores, {"reward": scores}, bad)

    def collect(self, prompts: list[str], indices: torch.Tensor, round_idx: int, keep_images: int = 16) -> Rollout:
        """This process's samples of the round: ``prompts`` [n] at global ``indices`` [n], sampled and scored."""
        bs = self.cfg.sample_batch_size
        latents, extras, rewards, images_kept, comps, bad, embeddings, held_out = [], {}, [], [], {}, 0, [], {}
        starts = progress_bar(range(0, len(indices), bs), desc="sampling", leave=False, inner=True,
                              enabled=self.accelerator.is_main_process)  # fmt: skip
        for start in starts:
            batch_prompts = prompts[start : start + bs]
            record = self.record(batch_prompts, indices[start : start + bs], round_idx)
            record.latents = self.family.finish_rollout(record.latents)
            with torch.no_grad(), self.accelerator.autocast():
                images = self.family.decode(record.latents)
            out = self.score(images, batch_prompts)
            latents.append(record.latents)
            for name, value in record.extras.items():
                extras.setdefault(name, []).append(value)
            rewards.append(out.rewards)
            for name, value in out.components.items():
                comps.setdefault(name, []).append(value)
            for name, value in self.judges.score(images, batch_prompts).items():  # after the reward: never trained on
                held_out.setdefault(name, []).append(value)
            bad += out.num_nonfinite
            if callable(self.embed_fn):
                with torch.no_grad():
                    embeddings.append(torch.as_tensor(self.embed_fn(images)).detach().float().reshape(len(images), -1))
            if sum(len(im) for im in images_kept) < keep_images:
                images_kept.append(images.cpu())
        return Rollout(
            latents=torch.cat(latents),
            extras={k: torch.cat(v) for k, v in extras.items()},
            prompts=prompts,
            indices=indices,
            rewards=torch.cat(rewards),
            components={k: torch.cat(v) for k, v in comps.items()},
            num_nonfinite=bad,
            images=torch.cat(images_kept)[:keep_images],
            embeddings=torch.cat(embeddings) if embeddings else None,
            held_out={k: torch.cat(v) for k, v in held_out.items()},
        )

    def validation_due(self, rounds_done: int) -> bool:
        """Before training, every ``validation_interval`` rounds, and after the last round."""
        if not self.validation_prompts:
            return False
        cfg = self.cfg
        return rounds_done == 0 or rounds_done % cfg.validation_interval == 0 or rounds_done == cfg.num_epochs

    def maybe_validate(self, rounds_done: int) -> None:
        if self.validation_due(rounds_done):
            self.validate(rounds_done)

    def validate(self, rounds_done: int) -> Optional[torch.Tensor]:
        """Render ``validation_prompts`` from fixed noise with the sampler: the same prompts and the same
        noise every time, so successive grids show the policy evolving. Main process only (no collective
        inside). Returns the rewards [len(validation_prompts)] (None on other processes)."""
        if not self.accelerator.is_main_process:
            return None
        prompts = self.validation_prompts
        noise = per_sample_noise(self.latent_shape, self.cfg.seed, (0, streams.VALIDATION), range(len(prompts)))
        bs = self.cfg.sample_batch_size
        images, rewards, held_out = [], [], {}
        for start in range(0, len(prompts), bs):
            x1 = self.from_noise(prompts[start : start + bs], noise[start : start + bs])
            with torch.no_grad(), self.accelerator.autocast():
                batch = self.family.decode(x1)
            rewards.append(self.score(batch, prompts[start : start + bs]).rewards)
            for name, values in self.judges.score(batch, prompts[start : start + bs]).items():
                held_out.setdefault(name, []).append(values)
            images.append(batch.cpu())
        rewards_t = torch.cat(rewards)
        means = {name: torch.cat(v).mean().item() for name, v in held_out.items()}
        self.log.validation(rounds_done, torch.cat(images), rewards_t, means)
        return rewards_t
