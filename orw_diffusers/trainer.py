"""``ORWCFMTrainer``: the online ORW-CFM-W2 loop with Accelerate.

Each round is a flat sequence of named phases (DESIGN.md section 1):
sample -> reward -> weights -> optimise -> refresh sampler -> metrics and sample grid -> validation
-> log -> checkpoint. Checkpoints and resuming are in ``checkpoint.py``, grids in ``images.py``, the
model card and the Hub upload in ``hub.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint, hub, lora
from .checkpoint import LORA_WEIGHTS_NAME
from .config import Sizes, TrainConfig, derive_sizes, save_yaml
from .flow import interpolate, per_sample_noise, sample_generator, sample_sigmas, target_velocity
from .images import image_grid, mean_pairwise_distance, save_image
from .loss import effective_sample_size, orw_cfm_w2_loss, reward_weights
from .models import FlowFamily, LoadOptions, PromptCache, load_family
from .prompts import load_prompts
from .rewards import RewardOutput, build_reward, clean_scores
from .sampling import sample_ode

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Independent random streams of one sample within one round: (seed, round, stream, [inner epoch,] index).
STREAM_SAMPLING_NOISE = 0
STREAM_TRAIN_NOISE = 1
STREAM_TRAIN_SIGMA = 2
# The validation renders use (seed, 0, STREAM_VALIDATION, prompt index): the same noise every time.
STREAM_VALIDATION = 3
# Diversity is computed on at most this many samples (the first, in global order): pdist is quadratic.
DIVERSITY_MAX_SAMPLES = 512
# Keys that may change when resuming without making the run differ from an uninterrupted one.
RESUME_FREE_KEYS = {
    "resume_from_checkpoint", "num_epochs", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "sample_log_interval", "validation_prompts", "validation_interval", "per_prompt_log_max",
    "push_to_hub", "hub_model_id", "hub_private", "log_sample_rewards",
}  # fmt: skip


@dataclass
class Rollout:
    """One round's samples on this process (local rows; ``indices`` are global sample indices)."""

    latents: torch.Tensor  # [n, *latent_shape], clean x1, on the training device
    prompts: list[str]  # [n]
    indices: torch.Tensor  # [n] long, global sample index
    rewards: torch.Tensor  # [n] float32 CPU
    components: dict[str, torch.Tensor]  # name -> [n]
    num_nonfinite: int
    images: torch.Tensor  # [min(n, keep_images), 3, H, W] float32 CPU, for logging
    embeddings: Optional[torch.Tensor] = None  # [n, D] from the reward's ``embed``, if it has one


class ORWCFMTrainer:
    """Online Reward-Weighted CFM with W2 regularisation, LoRA on one transformer.

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
    ):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.prompts = load_prompts(cfg)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "logs")),
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        if not acc.is_main_process:  # one process speaks; the others only warn
            _quiet_logging()
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # the LoRA A matrices are drawn from the global RNG
        self.sizes: Sizes = derive_sizes(cfg, len(self.prompts), acc.num_processes)
        self.device = acc.device
        self.weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
        if self.device.type == "cpu" and self.weight_dtype == torch.float16:
            logger.warning("fp16 weights are not supported on CPU; using float32 (bf16 works on CPU)")
            self.weight_dtype = torch.float32

        # Model: load on CPU, encode every prompt once, drop the text encoders, then move the rest.
        options = LoadOptions(
            cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.load_t5, cfg.max_sequence_length
        )
        self.family: FlowFamily = load_family(options, self.weight_dtype)
        # The true-CFG scale of the sampler: guidance_scale itself (SD3), or 1 for a guidance-distilled
        # family (FLUX.1-dev), which feeds guidance_scale to its guidance embedding in every forward instead.
        self.sampling_guidance_scale = self.family.configure_guidance(cfg.guidance_scale)
        self.validation_prompts = list(cfg.validation_prompts or [])
        self.prompt_cache = PromptCache(
            self.family, self.prompts + self.validation_prompts + [cfg.negative_prompt], self.device
        )
        # Index i of reward_by_prompt/<i>: line i of output_dir/prompts.txt (the unique training prompts).
        self.prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(self.prompts))}
        self.family.release_text_encoders()
        from diffusers.training_utils import free_memory

        free_memory()
        self.family.vae.to(self.device).requires_grad_(False).eval()
        transformer = self.family.transformer.to(self.device)
        self.latent_shape = self.family.latent_shape(cfg.resolution)
        self.sampling_sigmas = self.family.sampling_sigmas(cfg.num_sampling_steps, self.latent_shape)

        # Adapters: trained 'default' + 'sampler'; the reference is the same model with adapters off.
        targets = cfg.lora_target_modules or self.family.lora_target_modules
        self.params = lora.add_adapters(transformer, cfg.rank, cfg.lora_alpha, targets)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        # Accelerate steps a prepared scheduler once per process per optimizer step.
        lr_scheduler = get_scheduler(
            "constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes
        )
        self.transformer, self.optimizer, self.lr_scheduler = acc.prepare(transformer, optimizer, lr_scheduler)

        reward_device = torch.device(cfg.reward_device) if cfg.reward_device else self.device
        if reward_fn is None:
            reward_dtype = getattr(torch, cfg.reward_dtype)
            reward_fn = build_reward(cfg.reward, reward_device, dtype=reward_dtype, batch_size=cfg.reward_batch_size)
        self.reward_fn = reward_fn
        self.reward_device = reward_device
        self.embed_fn = getattr(reward_fn, "embed", None)
        self.hub_api = hub_api
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.samples_dir = os.path.join(cfg.output_dir, "samples")
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            logger.info("sizes: %s", self.sizes.describe())
            space = "the reward's embedding" if callable(self.embed_fn) else "latent"
            logger.info("diversity: mean pairwise L2 distance of a round's samples in %s space", space)

        # Checkpoints hold the two adapters, not the frozen model: see save_state_hook / load_state_hook.
        acc.register_save_state_pre_hook(self.save_state_hook)
        acc.register_load_state_pre_hook(self.load_state_hook)
        self.start_round = 0
        self.rounds_done = 0
        self.resumed_from = checkpoint.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        if self.resumed_from is not None:
            acc.load_state(self.resumed_from)  # adapters, optimizer, scheduler, scaler, RNG; sets start_round
            self.rounds_done = self.start_round
            if acc.is_main_process:
                logger.info("resumed from %s: continuing at round %d", self.resumed_from, self.start_round)

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)

    def round_prompts(self, round_idx: int) -> list[str]:
        """The round's ``prompts_per_round`` prompts: a cursor over seeded per-pass permutations.

        Depends only on ``(seed, round)``, so a resumed run draws the same prompts.
        """
        n, k = len(self.prompts), self.sizes.prompts_per_round
        out = []
        for pos in range(round_idx * k, (round_idx + 1) * k):
            perm = torch.randperm(n, generator=sample_generator(self.cfg.seed, 7, pos // n))
            out.append(self.prompts[int(perm[pos % n])])
        return out

    def local_indices(self) -> torch.Tensor:
        """Global sample indices of this process: strided, so that micro-batch k of every process
        together is exactly micro-batch k of a single process with the summed batch size."""
        acc = self.accelerator
        return torch.arange(acc.process_index, self.sizes.samples_per_round, acc.num_processes)

    # --- phase 1 + 2: sample and reward --------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, prompts: list[str], indices: torch.Tensor, round_idx: int) -> torch.Tensor:
        """x1 for each (prompt, global index) with the sampler adapter: [n, *latent_shape]."""
        noise = per_sample_noise(self.latent_shape, self.cfg.seed, (round_idx, STREAM_SAMPLING_NOISE), indices)
        return self.sample_from_noise(prompts, noise)

    @torch.no_grad()
    def sample_from_noise(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """The sampler adapter's ODE from ``noise`` [n, *latent_shape] to x1 [n, *latent_shape]."""
        noise = noise.to(self.device, self.weight_dtype)
        cond = self.prompt_cache.get(prompts, self.device)
        uncond = self.prompt_cache.get([self.cfg.negative_prompt] * len(prompts), self.device)
        model = self.unwrapped
        model.eval()
        with lora.sampler_adapter(model):
            return sample_ode(
                self.family, model, noise, cond, uncond, self.sampling_sigmas, self.sampling_guidance_scale,
                self.accelerator.autocast, self.cfg.sampling_solver,
            )  # fmt: skip

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        out = self.reward_fn(images, prompts)
        if isinstance(out, RewardOutput):
            return out
        scores, bad = clean_scores(torch.as_tensor(out).detach().float().cpu().reshape(-1), "reward")
        return RewardOutput(scores, {"reward": scores}, bad)

    def rollout(self, round_idx: int, keep_images: int = 16) -> Rollout:
        round_prompts = self.round_prompts(round_idx)
        indices = self.local_indices()
        prompts = [round_prompts[int(i) % len(round_prompts)] for i in indices]
        bs = self.cfg.sample_batch_size
        latents, rewards, images_kept, comps, bad, embeddings = [], [], [], {}, 0, []
        # Inner bars: main process, and only on a terminal (disable=None), so log files get the rounds bar only.
        quiet = None if self.accelerator.is_main_process else True
        bar = tqdm(range(0, len(indices), bs), desc="sampling", leave=False, disable=quiet)
        for start in bar:
            batch_prompts = prompts[start : start + bs]
            x1 = self.sample_latents(batch_prompts, indices[start : start + bs], round_idx)
            with torch.no_grad(), self.accelerator.autocast():
                images = self.family.decode(x1)
            out = self.score(images, batch_prompts)
            latents.append(x1)
            rewards.append(out.rewards)
            for name, value in out.components.items():
                comps.setdefault(name, []).append(value)
            bad += out.num_nonfinite
            if callable(self.embed_fn):
                with torch.no_grad():
                    embeddings.append(torch.as_tensor(self.embed_fn(images)).detach().float().reshape(len(images), -1))
            if sum(len(im) for im in images_kept) < keep_images:
                images_kept.append(images.cpu())
        return Rollout(
            latents=torch.cat(latents),
            prompts=prompts,
            indices=indices,
            rewards=torch.cat(rewards),
            components={k: torch.cat(v) for k, v in comps.items()},
            num_nonfinite=bad,
            images=torch.cat(images_kept)[:keep_images],
            embeddings=torch.cat(embeddings) if embeddings else None,
        )

    # --- phase 3: weights over the global batch ------------------------------------------------
    def gather_global(self, local: torch.Tensor, indices: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Gather a per-sample tensor [n, ...] from every process and put it in global index order."""
        acc = self.accelerator
        values = acc.gather(local.to(self.device).contiguous())
        order = acc.gather(indices.to(self.device))
        out = torch.empty_like(values)
        out[order] = values
        return out.cpu() if to_cpu else out

    def compute_weights(self, global_rewards: torch.Tensor, round_idx: int) -> torch.Tensor:
        round_prompts = self.round_prompts(round_idx)
        group_ids = torch.tensor(
            [self.prompt_cache.index[round_prompts[i % len(round_prompts)]] for i in range(len(global_rewards))]
        )
        return reward_weights(global_rewards, self.cfg.temperature, self.cfg.weight_normalization, group_ids)

    # --- phase 4: optimise ----------------------------------------------------------------------
    def optimise(self, rollout: Rollout, weights: torch.Tensor, round_idx: int) -> dict[str, torch.Tensor]:
        """``num_inner_epochs`` passes over the round's samples in micro-batches. weights: [n] local."""
        cfg, acc, family = self.cfg, self.accelerator, self.family
        model, ref_model = self.transformer, self.unwrapped
        need_ref = cfg.w2_coefficient > 0 or cfg.log_w2_distance
        sums = {k: torch.zeros((), device=self.device) for k in ("loss", "fm_loss", "weighted_fm_loss", "w2_loss")}
        grad_norms = []
        n_micro = 0
        bs = cfg.train_batch_size
        model.train()
        bar = tqdm(total=cfg.num_inner_epochs * self.sizes.micro_batches_per_process, desc="optimising", leave=False,
                   disable=None if acc.is_main_process else True)  # fmt: skip
        for inner in range(cfg.num_inner_epochs):
            for start in range(0, len(rollout.indices), bs):
                rows = torch.arange(start, start + bs)
                idx = rollout.indices[rows]
                latents = rollout.latents[rows]
                noise = per_sample_noise(self.latent_shape, cfg.seed, (round_idx, STREAM_TRAIN_NOISE, inner), idx)
                noise = noise.to(self.device, latents.dtype)
                sigmas = sample_sigmas(
                    cfg.sigma_sampling, cfg.seed, (round_idx, STREAM_TRAIN_SIGMA, inner), idx, cfg.logit_mean, cfg.logit_std
                ).to(self.device)
                x_t = interpolate(latents, noise, sigmas)
                v_target = target_velocity(latents, noise)
                # the micro-batch's embeddings only: the round's would make peak memory grow with the round
                cond = self.prompt_cache.get(rollout.prompts[start : start + bs], self.device)
                with acc.accumulate(model):
                    v_ref = None
                    if need_ref:
                        with lora.reference(ref_model), acc.autocast():
                            v_ref = family.predict_velocity(ref_model, x_t, sigmas, cond)
                    with acc.autocast():
                        v_pred = family.predict_velocity(model, x_t, sigmas, cond)
                    out = orw_cfm_w2_loss(v_pred, v_target, v_ref, weights[rows], cfg.w2_coefficient)
                    acc.backward(out.loss)
                    if acc.sync_gradients:
                        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                        grad_norms.append(acc.clip_grad_norm_(self.params, max_norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for key in sums:
                    sums[key] += getattr(out, key).detach()
                n_micro += 1
                bar.update()
        bar.close()
        stats = {k: acc.reduce(v / n_micro, reduction="mean") for k, v in sums.items()}
        stats["grad_norm"] = torch.stack([torch.as_tensor(g, device=self.device).float() for g in grad_norms]).mean()
        return stats

    # --- phase 5: refresh ----------------------------------------------------------------------
    def refresh_sampler(self, round_idx: int) -> bool:
        if (round_idx + 1) % self.cfg.sampler_update_interval == 0:
            lora.copy_adapter(self.unwrapped, lora.TRAINED, lora.SAMPLER)
            return True
        return False

    # --- one round -------------------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict[str, Any]:
        """Phases 1-6 of one round. Returns its metrics (logged by ``log``)."""
        t0 = time.perf_counter()
        rollout = self.rollout(round_idx)  # 1-2: sample with the sampler adapter, reward
        global_rewards = self.gather_global(rollout.rewards, rollout.indices)
        weights_global = self.compute_weights(global_rewards, round_idx)  # 3: weights over the global batch
        local_weights = weights_global[rollout.indices].to(self.device)
        stats = self.optimise(rollout, local_weights, round_idx)  # 4: optimise
        refreshed = self.refresh_sampler(round_idx)  # 5: refresh the sampler
        metrics = self.round_metrics(round_idx, rollout, global_rewards, weights_global, stats, refreshed)  # 6
        self.log_sample_grid(round_idx, rollout)
        self.write_sample_rewards(round_idx, global_rewards, weights_global)
        metrics["seconds"] = time.perf_counter() - t0
        return metrics

    # --- phase 6: metrics and sample grids -----------------------------------------------------
    def round_metrics(
        self,
        round_idx: int,
        rollout: Rollout,
        global_rewards: torch.Tensor,
        weights_global: torch.Tensor,
        stats: dict[str, torch.Tensor],
        refreshed: bool,
    ) -> dict[str, Any]:
        """The round's scalars. Collective: every process calls it (the gathers)."""
        metrics: dict[str, Any] = {
            "epoch": round_idx,
            "reward_mean": global_rewards.mean().item(),
            "reward_std": global_rewards.std(unbiased=False).item(),
            "reward_min": global_rewards.min().item(),
            "reward_max": global_rewards.max().item(),
        }
        for name, values in rollout.components.items():
            metrics[f"reward/{name}_mean"] = self.gather_global(values, rollout.indices).mean().item()
        nonfinite = self.accelerator.reduce(torch.tensor(rollout.num_nonfinite, device=self.device), reduction="sum")
        metrics.update(
            {
                "reward_nonfinite": int(nonfinite.item()),
                "loss": stats["loss"].item(),
                "fm_loss": stats["fm_loss"].item(),
                "weighted_fm_loss": stats["weighted_fm_loss"].item(),
                "w2_loss": stats["w2_loss"].item(),
                "ess": effective_sample_size(weights_global).item(),
                "weight_max": weights_global.max().item(),
                "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": stats["grad_norm"].item(),
                "diversity": self.diversity(rollout).item(),
                "sampler_refreshed": refreshed,
                "samples_seen": (round_idx + 1) * self.sizes.samples_per_round,
            }
        )
        metrics.update(self.reward_by_prompt(global_rewards, round_idx))
        return metrics

    def diversity(self, rollout: Rollout) -> torch.Tensor:
        """Mean pairwise L2 distance of the round's samples over all processes: in the reward's
        embedding space when the reward has ``embed``, else between flattened latents. A collapsing
        policy (w2_coefficient too small) shows up here before it shows in the reward."""
        local = rollout.embeddings if rollout.embeddings is not None else rollout.latents
        local = local.reshape(len(rollout.indices), -1).float()
        features = self.gather_global(local, rollout.indices, to_cpu=False)[:DIVERSITY_MAX_SAMPLES]
        return mean_pairwise_distance(features)

    def reward_by_prompt(self, global_rewards: torch.Tensor, round_idx: int) -> dict[str, float]:
        """``reward_by_prompt/<i>``: mean reward of each prompt of the round, for rounds with at most
        ``per_prompt_log_max`` unique prompts (i: line of ``prompts.txt``)."""
        round_prompts = self.round_prompts(round_idx)
        sample_prompts = [round_prompts[i % len(round_prompts)] for i in range(len(global_rewards))]
        unique = sorted(set(sample_prompts), key=self.prompt_ids.__getitem__)
        if not 0 < len(unique) <= self.cfg.per_prompt_log_max:
            return {}
        out = {}
        for prompt in unique:
            mask = torch.tensor([p == prompt for p in sample_prompts])
            out[f"reward_by_prompt/{self.prompt_ids[prompt]}"] = global_rewards[mask].mean().item()
        return out

    def log_sample_grid(self, round_idx: int, rollout: Rollout) -> Optional[str]:
        """Every ``sample_log_interval`` rounds: the main process's first samples of the round with
        their prompt index and reward, to ``samples/round_XXXX.png`` (XXXX = round) and the tracker."""
        interval = self.cfg.sample_log_interval
        if not interval or round_idx % interval or not self.accelerator.is_main_process:
            return None
        n = len(rollout.images)
        captions = [
            f"p{self.prompt_ids[p]} r={r:.3g}" for p, r in zip(rollout.prompts[:n], rollout.rewards[:n].tolist())
        ]
        grid = image_grid(rollout.images, ncols=math.ceil(math.sqrt(n)), captions=captions)
        path = save_image(grid, os.path.join(self.samples_dir, f"round_{round_idx:04d}.png"))
        self.log_image("samples", grid, step=round_idx)
        return path

    def write_sample_rewards(self, round_idx: int, global_rewards: torch.Tensor, weights_global: torch.Tensor) -> None:
        if not (self.cfg.log_sample_rewards and self.accelerator.is_main_process):
            return
        round_prompts = self.round_prompts(round_idx)
        row = {
            "epoch": round_idx,
            "prompts": [round_prompts[i % len(round_prompts)] for i in range(len(global_rewards))],
            "rewards": global_rewards.tolist(),
            "weights": weights_global.tolist(),
        }
        with open(os.path.join(self.cfg.output_dir, "rewards.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    # --- validation renders --------------------------------------------------------------------------
    def validation_due(self, rounds_done: int) -> bool:
        """Before training, every ``validation_interval`` rounds, and after the last round."""
        if not self.validation_prompts:
            return False
        return rounds_done == 0 or rounds_done % self.cfg.validation_interval == 0 or rounds_done == self.cfg.num_epochs

    def validate(self, rounds_done: int) -> Optional[torch.Tensor]:
        """Render ``validation_prompts`` from fixed noise with the sampler adapter: the same prompts
        and the same noise every time, so successive grids show the policy evolving.

        Main process only (no collective inside). Writes ``samples/validation_XXXX.png`` (XXXX =
        rounds trained) and a row of ``samples/validation.jsonl``, and logs both to the tracker at
        step ``rounds_done``. Returns the rewards [len(validation_prompts)] (None on other processes).
        """
        if not self.accelerator.is_main_process:
            return None
        prompts = self.validation_prompts
        noise = per_sample_noise(self.latent_shape, self.cfg.seed, (0, STREAM_VALIDATION), range(len(prompts)))
        bs = self.cfg.sample_batch_size
        images, rewards = [], []
        for start in range(0, len(prompts), bs):
            x1 = self.sample_from_noise(prompts[start : start + bs], noise[start : start + bs])
            with torch.no_grad(), self.accelerator.autocast():
                batch = self.family.decode(x1)
            rewards.append(self.score(batch, prompts[start : start + bs]).rewards)
            images.append(batch.cpu())
        rewards_t = torch.cat(rewards)
        captions = [f"v{i} r={r:.3g}" for i, r in enumerate(rewards_t.tolist())]
        grid = image_grid(torch.cat(images), ncols=min(len(prompts), 8), captions=captions)
        save_image(grid, os.path.join(self.samples_dir, f"validation_{rounds_done:04d}.png"))
        with open(os.path.join(self.samples_dir, "validation.jsonl"), "a") as f:
            f.write(json.dumps({"rounds_trained": rounds_done, "rewards": rewards_t.tolist()}) + "\n")
        self.log_image("validation", grid, step=rounds_done)
        self.accelerator.log({"validation/reward_mean": rewards_t.mean().item()}, step=rounds_done)
        return rewards_t

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """A PIL image to every tracker that takes images (TensorBoard needs its layout spelled out)."""
        import numpy as np

        batch = np.asarray(image)[None]  # [1, H, W, 3] uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: batch}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: list(batch)}, step=step)

    def log(self, metrics: dict[str, Any]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["epoch"]))

    # --- checkpoints -------------------------------------------------------------------------------
    def save_state_hook(self, models: list, weights: list, directory: str) -> None:
        """Accelerate's save_state pre-hook: both adapters in diffusers format and the trainer state.

        Emptying ``weights`` keeps Accelerate from writing the full transformer (gigabytes of frozen
        weights) into every checkpoint; the optimizer, scheduler, scaler and RNG states it still saves.
        """
        weights.clear()
        if self.accelerator.is_main_process:
            checkpoint.save_adapters(directory, self.family, self.unwrapped)
            state = checkpoint.TrainerState(
                rounds_done=self.rounds_done,
                prompt_cursor=self.rounds_done * self.sizes.prompts_per_round,
                samples_seen=self.rounds_done * self.sizes.samples_per_round,
                config=self.cfg.to_dict(),
            )
            checkpoint.write_state(directory, state)

    def load_state_hook(self, models: list, directory: str) -> None:
        """Accelerate's load_state pre-hook: the adapters and the round counter (every process)."""
        models.clear()  # nothing of the frozen model is in a checkpoint
        checkpoint.load_adapters(directory, self.unwrapped)
        state = checkpoint.read_state(directory)
        self.start_round = state.rounds_done
        if self.accelerator.is_main_process:
            now = self.cfg.to_dict()
            changed = [k for k in now if k not in RESUME_FREE_KEYS and k in state.config and state.config[k] != now[k]]
            for key in changed:
                logger.warning(
                    "resuming with %s=%r, the checkpoint was written with %r: the run will differ from an "
                    "uninterrupted one",
                    key, now[key], state.config[key],
                )  # fmt: skip

    def maybe_checkpoint(self, rounds_done: int) -> Optional[str]:
        """Every ``checkpointing_steps`` rounds and after the last round (so a run can be extended)."""
        steps = self.cfg.checkpointing_steps
        if not steps or (rounds_done % steps and rounds_done != self.cfg.num_epochs):
            return None
        t0 = time.perf_counter()
        limit = self.cfg.checkpoints_total_limit
        path = checkpoint.save_checkpoint(self.accelerator, self.cfg.output_dir, rounds_done, limit)
        if self.accelerator.is_main_process:
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
            logger.info("checkpoint %s: %.1f MB in %.2f s", path, size / 2**20, time.perf_counter() - t0)
        return path

    # --- the loop --------------------------------------------------------------------------------
    def prepare_output_dir(self) -> None:
        """config.yaml, prompts.txt, and the per-round logs cut back to the rounds before ``start_round``
        (a resumed run rewrites the rounds after its checkpoint; a fresh run starts them empty)."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            with open(os.path.join(cfg.output_dir, "prompts.txt"), "w") as f:
                f.writelines(p.replace("\n", " ") + "\n" for p in self.prompt_ids)
            _truncate_jsonl(self.metrics_path, "epoch", self.start_round)
            _truncate_jsonl(os.path.join(cfg.output_dir, "rewards.jsonl"), "epoch", self.start_round)
            _truncate_jsonl(os.path.join(self.samples_dir, "validation.jsonl"), "rounds_trained", self.start_round)
        acc.wait_for_everyone()

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        self.prepare_output_dir()
        if cfg.report_to != "none":
            # A resumed run drops the TensorBoard events of the rounds it is about to redo.
            init_kwargs = {"tensorboard": {"purge_step": self.start_round}} if self.start_round else {}
            acc.init_trackers(
                "orw-cfm-w2", config={k: v for k, v in cfg.to_dict().items() if _scalar(v)}, init_kwargs=init_kwargs
            )
        if self.validation_due(self.start_round):
            self.validate(self.start_round)
        metrics: dict[str, Any] = {}
        bar = tqdm(
            range(self.start_round, cfg.num_epochs), desc="rounds", initial=self.start_round, total=cfg.num_epochs,
            disable=not acc.is_main_process,
        )  # fmt: skip
        for round_idx in bar:
            metrics = self.run_round(round_idx)
            self.log(metrics)
            self.rounds_done = round_idx + 1
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", w2=f"{metrics['w2_loss']:.3g}")
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss in round {round_idx}: {metrics['loss']}")
            if self.validation_due(self.rounds_done):
                self.validate(self.rounds_done)
            self.maybe_checkpoint(self.rounds_done)
        self.save(cfg.output_dir)
        acc.end_training()
        self.finish()
        return metrics

    def save(self, output_dir: str) -> None:
        """The trained adapter in diffusers format: ``output_dir/pytorch_lora_weights.safetensors``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = self.unwrapped
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora.adapter_state_dict(model).items()}
            self.family.save_lora_weights(output_dir, state, lora.adapter_metadata(model))
        acc.wait_for_everyone()

    def finish(self) -> None:
        """Main process, after the weights are saved: the model card, the Hub upload if asked, one summary line.

        A failed upload prints the retry command and raises ``hub.HubUploadError`` (the run exits
        non-zero); the weights and the card are on disk either way.
        """
        cfg = self.cfg
        if not self.accelerator.is_main_process:
            return
        hub.write_model_card(cfg.output_dir, cfg.hub_model_id if cfg.push_to_hub else None)
        where = ""
        if cfg.push_to_hub:
            try:
                repo_id = hub.push_to_hub(cfg.output_dir, cfg.hub_model_id, private=cfg.hub_private, api=self.hub_api)
            except hub.HubUploadError as e:
                print(f"error: {e}", file=sys.stderr)
                raise
            where = f"; on the Hub as {repo_id}: pipe.load_lora_weights({repo_id!r})"
        path = os.path.join(cfg.output_dir, LORA_WEIGHTS_NAME)
        print(
            f"done: {self.rounds_done} rounds, {self.rounds_done * self.sizes.samples_per_round} samples. "
            f"LoRA weights: {path} (load with pipe.load_lora_weights({cfg.output_dir!r})){where}"
        )


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


def _truncate_jsonl(path: str, key: str, keep_below: int) -> None:
    """Keep the rows of a JSON-lines log whose ``key`` is below ``keep_below``; rewritten atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get(key, -1) < keep_below]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def _quiet_logging() -> None:
    """Non-main processes: warnings and errors only, from us and from the libraries."""
    logging.getLogger("orw_diffusers").setLevel(logging.WARNING)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:  # the verbosity helpers are a nicety, not a requirement
        pass
