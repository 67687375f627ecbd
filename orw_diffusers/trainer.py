"""``Trainer``: the online round loop with Accelerate, for any objective, policy and model.

Each round is a flat sequence of named phases (docs/method.md, "The method in one screen"):
sample -> reward -> signal -> optimise -> refresh sampler -> metrics -> log -> checkpoint.
The loop talks to three seams and names none of their implementations: the objective
(``objectives/``: what a rollout records, the training signal, the losses), the policy
(``policies/``: the trained weights, the sampler and the reference) and the model (``models/``:
shapes, sigmas, velocity, decode, conditioning). Sampling, rewards and validation renders are in
``rollouts.py``; the round's metrics in ``round_metrics.py``; run logs in ``run_log.py``; checkpoints and
their hooks in ``checkpoint.py``; the model card in ``card.py``; the Hub upload in ``hub.py``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import torch
from . import build, checkpoint, hub
from .config import Sizes, TrainConfig, derive_sizes
from .models import FlowModel
from .objectives import Fields, MicroBatch, Signal, build_objective
from .objectives.base import slice_extras
from .policies import build_policy
from .progress import progress_bar
from .prompts import load_prompts, round_prompts
from .rollouts import Rollout, Rollouts, micro_batch_rows
from .round_metrics import diversity_space, round_metrics
from .run_log import RunLog, quiet_logging, reward_by_prompt
from .sampling import guided_field

logger = logging.getLogger(__name__)


class Trainer:
    """The online loop. ``model`` replaces loading ``cfg.pretrained_model_name_or_path`` (any ``FlowModel``).

    ``reward_fn`` overrides ``cfg.reward`` with any callable ``(images [B,3,H,W] in [0,1], prompts) -> [B]``.
    If it also has ``embed(images) -> [B, D]``, the diversity metric is measured in that space.
    ``hub_api`` replaces ``huggingface_hub.HfApi()`` for ``push_to_hub`` (tests pass a fake).
    With ``cfg.resume_from_checkpoint`` the constructor restores the checkpoint; ``train`` continues from it.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        reward_fn: Optional[Callable[[torch.Tensor, list[str]], Any]] = None,
        accelerator: Optional[Any] = None,
        hub_api: Optional[Any] = None,
        model: Optional[FlowModel] = None,
    ):
        from accelerate.utils import set_seed

        self.prompts = load_prompts(cfg)
        self.accelerator = acc = accelerator or build.make_accelerator(cfg)
        if not acc.is_main_process:  # one process speaks; the others only warn
            quiet_logging()
        set_seed(cfg.seed)  # LoRA's A matrices are drawn from the global RNG
        self.sizes: Sizes = derive_sizes(cfg, len(self.prompts), acc.num_processes)
        self.device = acc.device
        # The precision Accelerate runs (the config's, else the launch's): weights, config.yaml, checkpoints follow it.
        cfg, self.weight_dtype = build.resolve_precision(cfg, acc)
        self.cfg = cfg
        self.objective = build_objective(cfg)

        # Model: load on CPU, then prepare (a pipeline encodes every prompt once and drops its text encoders).
        model = model or build.load_model(cfg, self.weight_dtype)
        self.family: FlowModel = model
        # The true-CFG scale of the sampler: guidance_scale itself (SD3), or 1 for a guidance-distilled
        # family (FLUX.1-dev), which feeds guidance_scale to its guidance embedding in every forward instead.
        self.sampling_guidance_scale = model.configure_guidance(cfg.guidance_scale)
        self.training_guidance_scale = build.training_guidance(cfg, self.sampling_guidance_scale, acc.is_main_process)
        self.validation_prompts = list(cfg.validation_prompts or [])
        model.prepare(self.prompts + self.validation_prompts, cfg.negative_prompt, self.device)
        # Index i of reward_by_prompt/<i>: line i of output_dir/prompts.txt (the unique training prompts).
        self.prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(self.prompts))}
        self.latent_shape = model.latent_shape(cfg.resolution)
        self.sampling_sigmas = model.sampling_sigmas(cfg.num_sampling_steps, self.latent_shape)

        self.policy = build_policy(cfg, model)
        self.params = self.policy.attach(model.denoiser)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        optimizer, lr_scheduler = build.make_optimizer(cfg, self.params, acc.num_processes)
        self.transformer, self.optimizer, self.lr_scheduler = acc.prepare(model.denoiser, optimizer, lr_scheduler)

        self.reward_fn = reward_fn if reward_fn is not None else build.make_reward(cfg, self.device)
        self.judges = build.make_judges(cfg, self.device)  # eval_reward: scored, logged, never trained on
        self.hub_api = hub_api
        self.log = RunLog(cfg, acc, self.prompt_ids)
        self.rollouts = Rollouts(
            cfg, acc, model, self.unwrapped, self.policy, self.objective, self.reward_fn, self.judges, self.log,
            guidance_scale=self.sampling_guidance_scale, latent_shape=self.latent_shape, sigmas=self.sampling_sigmas,
            weight_dtype=self.weight_dtype, validation_prompts=self.validation_prompts,
        )  # fmt: skip
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            logger.info("sizes: %s", self.sizes.describe())
            logger.info("objective: %s; policy: %s", self.objective.name, self.policy.describe(cfg))
            logger.info("diversity: %s", diversity_space(self.rollouts.embed_fn))

        self.rounds_done = 0
        self.hooks = checkpoint.StateHooks(acc, self.policy, model, lambda: self.unwrapped, self.trainer_state, cfg.to_dict())
        self.resumed_from = checkpoint.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        if self.resumed_from is not None:
            acc.load_state(self.resumed_from)  # weights, optimizer, scheduler, scaler, RNG; the round counter
            self.rounds_done = self.hooks.rounds_done
            self.objective.load_state_dict(self.hooks.states.get("objective", {}))
            self.judges.load_state_dict(self.hooks.states.get("judges", {}))
            if acc.is_main_process:
                logger.info("resumed from %s: continuing at round %d", self.resumed_from, self.rounds_done)
        self.start_round = self.rounds_done

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)

    def trainer_state(self) -> checkpoint.TrainerState:
        return checkpoint.TrainerState(
            rounds_done=self.rounds_done,
            prompt_cursor=self.rounds_done * self.sizes.prompts_per_round,
            samples_seen=self.rounds_done * self.sizes.samples_per_round,
            config=self.cfg.to_dict(),
            states={"objective": self.objective.state_dict(), "judges": self.judges.state_dict()},
        )

    def round_prompts(self, round_idx: int) -> list[str]:
        """The round's ``prompts_per_round`` prompts (depends only on ``(seed, round)``: a resume draws the same)."""
        return round_prompts(self.prompts, self.cfg.seed, round_idx, self.sizes.prompts_per_round)

    def sample_prompts(self, round_idx: int) -> list[str]:
        """The prompt of every sample of the round, in global order: sample i has prompt i mod k."""
        round_prompts = self.round_prompts(round_idx)
        return [round_prompts[i % len(round_prompts)] for i in range(self.sizes.samples_per_round)]

    def local_indices(self) -> torch.Tensor:
        """Global sample indices of this process: strided, so that micro-batch k of every process
        together is exactly micro-batch k of a single process with the summed batch size."""
        acc = self.accelerator
        return torch.arange(acc.process_index, self.sizes.samples_per_round, acc.num_processes)

    def gather_global(self, local: torch.Tensor, indices: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Gather a per-sample tensor [n, ...] from every process and put it in global index order."""
        values = self.accelerator.gather(local.to(self.device).contiguous())
        order = self.accelerator.gather(indices.to(self.device))
        out = torch.empty_like(values)
        out[order] = values
        return out.cpu() if to_cpu else out

    # --- the velocity fields -------------------------------------------------------------------
    def training_fields(self, prompts: list[str]) -> Fields:
        """The policy's velocity (with grad) and the reference's, for a micro-batch of ``prompts``.

        With ``cfg_training: guided`` both are the guided field the sampler integrates (the two
        branches batched, gradients through both), so ``w2_loss`` bounds the distance between the
        distributions actually sampled; otherwise the conditional branch alone.
        """
        family, autocast, g = self.family, self.accelerator.autocast, self.training_guidance_scale
        # the micro-batch's embeddings only: the round's would make peak memory grow with the round
        cond = family.conditioning(prompts, self.device)
        uncond = family.negative_conditioning(len(prompts), self.device) if g > 1 else None
        policy = guided_field(family, self.transformer, cond, uncond, g, autocast)

        def reference(latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            with self.policy.reference(self.unwrapped) as net:
                return guided_field(family, net, cond, uncond, g, autocast)(latents, sigmas)

        def sampler(latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            with self.policy.sampler(self.unwrapped) as net:
                return guided_field(family, net, cond, uncond, g, autocast)(latents, sigmas)

        return Fields(policy=policy, reference=reference, sampler=sampler if self.objective.needs_sampler() else None)

    # --- phase 1 + 2: sample and reward (rollouts.py) ------------------------------------------
    def rollout(self, round_idx: int, sample_prompts: Optional[list[str]] = None) -> Rollout:
        """This process's samples of the round; ``sample_prompts``: the round's, if the caller has them."""
        indices = self.local_indices()
        sample_prompts = self.sample_prompts(round_idx) if sample_prompts is None else sample_prompts
        return self.rollouts.collect([sample_prompts[int(i)] for i in indices], indices, round_idx)

    # --- phase 4: optimise ----------------------------------------------------------------------
    def optimise(self, rollout: Rollout, signal: Signal, round_idx: int) -> dict[str, torch.Tensor]:
        """``num_inner_epochs`` passes over the round's samples that the signal keeps, in micro-batches."""
        cfg, acc, model = self.cfg, self.accelerator, self.transformer
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        grad_norms = []
        values = signal.values[rollout.indices].to(self.device)  # this process's rows
        batches = micro_batch_rows(len(rollout.indices), cfg.train_batch_size, signal.keep, acc.process_index,
                                   acc.num_processes)  # fmt: skip
        model.train()
        bar = progress_bar(total=cfg.num_inner_epochs * len(batches), desc="optimising", leave=False, inner=True,
                           enabled=acc.is_main_process)  # fmt: skip
        for inner in range(cfg.num_inner_epochs):
            for rows in batches:
                batch = MicroBatch(
                    round_idx=round_idx, inner_epoch=inner, seed=cfg.seed, indices=rollout.indices[rows],
                    latents=rollout.latents[rows], signal=values[rows], extras=slice_extras(rollout.extras, rows),
                )  # fmt: skip
                fields = self.training_fields([rollout.prompts[int(i)] for i in rows])
                with acc.accumulate(model):
                    for step in self.objective.losses(batch, fields):
                        acc.backward(step.loss)  # gradients accumulate over the micro-batch's losses
                        for key, value in step.metrics.items():
                            sums[key] = sums.get(key, torch.zeros((), device=self.device)) + value
                            counts[key] = counts.get(key, 0) + 1
                    if acc.sync_gradients:
                        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                        grad_norms.append(acc.clip_grad_norm_(self.params, max_norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                bar.update()
        bar.close()
        stats = {k: acc.reduce(v / counts[k], reduction="mean") for k, v in sums.items()}
        norms = [torch.as_tensor(g, device=self.device).float() for g in grad_norms]
        stats["grad_norm"] = torch.stack(norms).mean() if norms else torch.zeros((), device=self.device)
        kept = self.sizes.samples_per_round if signal.keep is None else int(signal.keep.sum())
        stats["trained_samples"] = torch.tensor(float(kept), device=self.device)  # the round's, all processes
        if not batches and acc.is_main_process:
            logger.warning("round %d: no sample is kept by the objective's signal: nothing was trained", round_idx)
        return stats

    # --- one round -------------------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict[str, Any]:
        """Phases 1-6 of one round. Returns its metrics (logged by ``train``)."""
        t0 = time.perf_counter()
        sample_prompts = self.sample_prompts(round_idx)
        rollout = self.rollout(round_idx, sample_prompts)  # 1-2: sample with the sampler, reward
        global_rewards = self.gather_global(rollout.rewards, rollout.indices)
        group_ids = torch.tensor([self.prompt_ids[p] for p in sample_prompts])
        signal = self.objective.signal(global_rewards, group_ids)  # 3: over the global batch
        stats = self.optimise(rollout, signal, round_idx)  # 4
        steps_done = (round_idx + 1) * self.sizes.optimizer_steps_per_round  # optimizer steps after this round
        sampler = self.objective.follow(self.policy, self.unwrapped, round_idx, steps_done)  # 5: the objective's way
        metrics = round_metrics(self, round_idx, rollout, global_rewards, signal.metrics, stats, sampler)  # 6
        metrics.update(self.objective.end_round(metrics))  # e.g. the next round's alpha under a W2 budget
        metrics.update(self.judges.observe(round_idx, metrics))  # the reward-hacking alarm
        metrics.update(reward_by_prompt(global_rewards, sample_prompts, self.prompt_ids, self.cfg.per_prompt_log_max))
        self.log.sample_grid(round_idx, rollout.images, rollout.prompts, rollout.rewards)
        self.log.sample_rewards(round_idx, sample_prompts, global_rewards, signal.values)
        metrics["seconds"] = time.perf_counter() - t0
        return metrics

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        self.log.prepare(self.start_round)
        self.rollouts.maybe_validate(self.start_round)
        metrics: dict[str, Any] = {}
        bar = progress_bar(range(self.start_round, cfg.num_epochs), desc="rounds", initial=self.start_round,
                           total=cfg.num_epochs, enabled=acc.is_main_process)  # fmt: skip
        for round_idx in bar:
            metrics = self.run_round(round_idx)
            self.log.metrics(metrics)
            self.rounds_done = round_idx + 1
            shown = {k: f"{metrics[k]:.3g}" for k in self.objective.progress_keys if k in metrics}
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", **shown, refresh=False)
            if not math.isfinite(metrics.get("loss", 0.0)):
                raise FloatingPointError(f"non-finite loss in round {round_idx}: {metrics['loss']}")
            self.rollouts.maybe_validate(self.rounds_done)
            saved = checkpoint.maybe_save(self.accelerator, cfg, self.rounds_done)
            if self.judges.stop_requested():  # the same on every process: the alarm reads reduced means
                if saved is None:
                    checkpoint.save_checkpoint(acc, cfg.output_dir, self.rounds_done, cfg.checkpoints_total_limit)
                break
        note = self.save(cfg.output_dir)
        if self.judges.stop_requested():
            note += f" Stopped by the reward-hacking alarm after round {self.judges.fired_at}."
        self.finish(note)
        return metrics

    def save(self, output_dir: str) -> str:
        """The trained weights, as the policy saves them (LoRA: ``pytorch_lora_weights.safetensors``)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        note = ""
        if acc.is_main_process:
            note = self.policy.save(output_dir, self.family, self.unwrapped)
        acc.wait_for_everyone()
        return note

    def finish(self, note: str) -> None:
        """After the weights are saved: close the trackers and the process group, after dropping the DDP wrapper (a
        wrapper that still holds gloo's group when the interpreter exits can abort the process after a successful
        run); then, main process only, the model card, the Hub upload if asked and one summary line."""
        acc = self.accelerator
        self.transformer = self.unwrapped
        acc.free_memory()  # accelerate's own references to the prepared model and optimizer
        gc.collect()
        acc.end_training()
        if acc.is_main_process:
            samples = self.rounds_done * self.sizes.samples_per_round
            hub.publish(self.cfg, f"done: {self.rounds_done} rounds, {samples} samples. {note}", api=self.hub_api)

