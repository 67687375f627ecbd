"""``ORWCFMTrainer``: the online ORW-CFM-W2 loop with Accelerate.

Each round is a flat sequence of named phases (DESIGN.md section 1):
sample -> reward -> weights -> optimise -> refresh sampler -> log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import lora
from .config import Sizes, TrainConfig, derive_sizes, save_yaml
from .flow import interpolate, per_sample_noise, sample_generator, sample_sigmas, target_velocity
from .loss import effective_sample_size, orw_cfm_w2_loss, reward_weights
from .models import FlowFamily, LoadOptions, PromptCache, load_family
from .prompts import load_prompts
from .rewards import RewardOutput, build_reward, clean_scores
from .sampling import euler_sample

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# Independent random streams of one sample within one round: (seed, round, stream, [inner epoch,] index).
STREAM_SAMPLING_NOISE = 0
STREAM_TRAIN_NOISE = 1
STREAM_TRAIN_SIGMA = 2


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


class ORWCFMTrainer:
    """Online Reward-Weighted CFM with W2 regularisation, LoRA on one transformer.

    ``reward_fn`` overrides ``cfg.reward`` with any callable ``(images [B,3,H,W] in [0,1], prompts) -> [B]``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        reward_fn: Optional[Callable[[torch.Tensor, list[str]], Any]] = None,
        accelerator: Optional[Any] = None,
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
        self.prompt_cache = PromptCache(self.family, self.prompts + [cfg.negative_prompt], self.device)
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
        self.start_round = 0
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            logger.info("sizes: %s", self.sizes.describe())

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
        noise = noise.to(self.device, self.weight_dtype)
        cond = self.prompt_cache.get(prompts, self.device)
        uncond = self.prompt_cache.get([self.cfg.negative_prompt] * len(prompts), self.device)
        model = self.unwrapped
        model.eval()
        with lora.sampler_adapter(model):
            return euler_sample(
                self.family, model, noise, cond, uncond, self.sampling_sigmas, self.cfg.guidance_scale,
                self.accelerator.autocast,
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
        latents, rewards, images_kept, comps, bad = [], [], [], {}, 0
        for start in range(0, len(indices), bs):
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
        )

    # --- phase 3: weights over the global batch ------------------------------------------------
    def gather_global(self, local: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Gather a per-sample tensor from every process and put it in global index order."""
        acc = self.accelerator
        values = acc.gather(local.to(self.device)).cpu()
        order = acc.gather(indices.to(self.device)).cpu()
        out = torch.empty_like(values)
        out[order] = values
        return out

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
        cond_all = self.prompt_cache.get(rollout.prompts, self.device)
        bs = cfg.train_batch_size
        model.train()
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
                cond = cond_all.select(rows)
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
    def run_round(self, round_idx: int) -> dict[str, float]:
        t0 = time.perf_counter()
        rollout = self.rollout(round_idx)
        global_rewards = self.gather_global(rollout.rewards, rollout.indices)
        weights_global = self.compute_weights(global_rewards, round_idx)
        local_weights = weights_global[rollout.indices].to(self.device)
        stats = self.optimise(rollout, local_weights, round_idx)
        refreshed = self.refresh_sampler(round_idx)

        metrics: dict[str, float] = {
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
                "sampler_refreshed": refreshed,
                "samples_seen": (round_idx + 1) * self.sizes.samples_per_round,
                "seconds": time.perf_counter() - t0,
            }
        )
        if self.cfg.log_sample_rewards and self.accelerator.is_main_process:
            round_prompts = self.round_prompts(round_idx)
            row = {
                "epoch": round_idx,
                "prompts": [round_prompts[i % len(round_prompts)] for i in range(len(global_rewards))],
                "rewards": global_rewards.tolist(),
                "weights": weights_global.tolist(),
            }
            with open(os.path.join(self.cfg.output_dir, "rewards.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return metrics

    def log(self, metrics: dict[str, float]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["epoch"]))

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        if cfg.report_to != "none":
            acc.init_trackers("orw-cfm-w2", config={k: v for k, v in cfg.to_dict().items() if _scalar(v)})
        metrics: dict[str, float] = {}
        bar = tqdm(range(self.start_round, cfg.num_epochs), desc="rounds", disable=not acc.is_main_process)
        for round_idx in bar:
            metrics = self.run_round(round_idx)
            self.log(metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", w2=f"{metrics['w2_loss']:.3g}")
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss in round {round_idx}: {metrics['loss']}")
        self.save(cfg.output_dir)
        acc.end_training()
        if acc.is_main_process:
            path = os.path.join(cfg.output_dir, LORA_WEIGHTS_NAME)
            print(f"LoRA weights: {path}  (load with pipe.load_lora_weights({cfg.output_dir!r}))")
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


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))
