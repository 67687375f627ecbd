"""The ORW-CFM-W2 authors' API on plain velocity models (a torchcfm ``UNetModelWrapper``, or any module
called as ``model(t, x)``), running on our round loop (``Trainer``)::

    from orw_diffusers.cfm import ORWCFMTrainer

    trainer = ORWCFMTrainer(model, config, device)          # config: the original keys, or any of ours
    trainer.load_pretrained("./pretrained/model.pt")        # torchcfm checkpoint: ema_model, else net_model
    trainer.train(num_epochs=1000, steps_per_epoch=100)
    trainer.save_checkpoint("./checkpoints/orw_cfm_w2.pt")  # net_model, last_policy, optim, sched, config

What one step of the original does, and what it is here:

- ``batch_size`` samples from the *last policy* (ODE from noise to data), rewarded, weighted by the raw
  ``exp(temperature * r)``, one Adam step on ``mean(w ||v - u||^2 + alpha ||v - v_ref||^2)``: one round
  of ``batch_size`` samples and one optimizer step, ``weight_normalization: none``, ``adam_weight_decay: 0``.
- the last policy refreshed at the end of each epoch: ``sampler_update_interval = steps_per_epoch``.
- three full copies (net, last policy, reference): ``policy: full``, the default (``policy: lora`` trains
  adapters instead).

Its defects are not repeated: each sample keeps its own noise and weight (no OT re-pairing), the
pretraining optimizer and scheduler are never restored, and every ``torch.load`` is ``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

#: the original's config keys -> ours (same meaning)
RENAMED_KEYS = {
    "warmup_steps": "lr_warmup_steps",
    "grad_clip": "max_grad_norm",
    "savedir": "output_dir",
    "wandb_project": "tracker_project",
    "run_name": "tracker_run_name",
}
#: the original's keys that become several of ours (see ``run_config``); ``ref_path`` is the user's to pass
#: to ``load_pretrained``
SPECIAL_KEYS = ("batch_size", "text_prompts", "use_wandb", "ref_path", "checkpoint_key")
REQUIRED_KEYS = ("learning_rate", "w2_coefficient", "temperature", "batch_size")
#: required only with the original's objective (the default): another ``objective`` takes its own keys
ORW_ONLY_KEYS = ("w2_coefficient", "temperature")
#: where this API's defaults differ from a run config's: the original's behaviour
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "weight_normalization": "none",  # raw exp(temperature * r)
    "adam_weight_decay": 0.0,  # Adam
    "guidance_scale": 1.0,  # unconditional
    "output_dir": "./results",
    "report_to": "none",
}
#: set per round by ``train`` and ``batch_size``: not config keys here
LOOP_KEYS = ("num_epochs", "sampler_update_interval", "images_per_prompt", "sample_batch_size", "train_batch_size",
             "prompts_per_round", "pretrained_model_name_or_path", "model_factory")  # fmt: skip


def run_config(config: Mapping[str, Any], reward_given: bool, num_rounds: int, steps_per_epoch: int) -> dict[str, Any]:
    """The original config (its keys or ours) -> the values of our ``TrainConfig``. One-line errors."""
    from .config import field_names

    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a dict of keys to values, got {type(config).__name__}")
    orw = config.get("objective", "orw_cfm_w2") == "orw_cfm_w2"
    missing = [k for k in REQUIRED_KEYS if k not in config and (orw or k not in ORW_ONLY_KEYS)]
    if not reward_given and "text_prompts" not in config and "reward" not in config:
        missing.append("text_prompts")
    if missing:
        raise ConfigError(f"config: missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)}; "
                          f"{' and '.join(ORW_ONLY_KEYS)} only with objective orw_cfm_w2, "
                          f"and text_prompts unless a reward_fn is given)")  # fmt: skip
    ours = set(field_names())
    # weight_normalization is ORW-CFM-W2's key: another objective would refuse it
    values: dict[str, Any] = {k: v for k, v in ORIGINAL_DEFAULTS.items() if orw or k != "weight_normalization"}
    for key, value in config.items():
        if key in SPECIAL_KEYS:
            continue
        if key in LOOP_KEYS:
            raise ConfigError(f"{key}: set by ORWCFMTrainer (batch_size and train's num_epochs, steps_per_epoch)")
        target = RENAMED_KEYS.get(key, key)
        if target not in ours:
            import difflib

            close = difflib.get_close_matches(key, [*ours, *RENAMED_KEYS, *SPECIAL_KEYS], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config: unknown key '{key}'{hint}")
        if target != key and target in config:
            raise ConfigError(f"config: {key!r} and {target!r} are the same setting; give one")
        values[target] = value
    batch = config["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ConfigError(f"batch_size: {batch!r} must be a positive integer")
    values.update(
        num_epochs=num_rounds, sampler_update_interval=steps_per_epoch, prompts_per_round=None,
        images_per_prompt=batch, sample_batch_size=batch, train_batch_size=batch,
    )  # fmt: skip
    values.setdefault("prompts", [""])  # one empty prompt: an unconditional model ignores it
    if config.get("use_wandb"):
        values["report_to"] = "wandb"
    if not reward_given and "reward" not in config:
        values["reward"] = clip_reward_spec(config["text_prompts"])
    return values


def clip_reward_spec(text_prompts: Any) -> list[dict[str, Any]]:
    """The original's reward, CLIP zero-shot ``P(text_prompts[0]) - P(text_prompts[1])``: our ``clip_zero_shot``."""
    if not (isinstance(text_prompts, (list, tuple)) and len(text_prompts) == 2
            and all(isinstance(p, str) and p.strip() for p in text_prompts)):  # fmt: skip
        raise ConfigError(f"text_prompts: {text_prompts!r} must be two prompts [positive, negative]")
    return [{"name": "clip_zero_shot", "kwargs": {"positive": [text_prompts[0]], "negative": [text_prompts[1]]}}]


def image_reward(reward_fn: Callable[[torch.Tensor], Any], channels: int) -> Callable[[torch.Tensor, list], torch.Tensor]:
    """``reward_fn(images [B, C, H, W] in [0, 1]) -> [B]`` as the loop calls rewards, checked: a wrong shape
    or a non-finite reward stops the run with one line (the original would train on NaN weights)."""

    def reward(images: torch.Tensor, prompts: list) -> torch.Tensor:
        scores = torch.as_tensor(reward_fn(images[:, :channels])).detach().float().cpu()
        if scores.shape != (len(images),):
            raise ValueError(f"reward_fn: returned shape {tuple(scores.shape)} for {len(images)} images; expected [B]")
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise ValueError(f"reward_fn: {bad} of {len(images)} rewards are not finite (NaN or inf)")
        return scores

    return reward


class ORWCFMTrainer:
    """``ORWCFMTrainer(model, config, device, reward_fn=None)``: the original API (see the module docstring).

    ``model``: an ``nn.Module`` called as ``model(t, x)`` (torchcfm's convention), trained in place.
    ``config``: the original keys (``learning_rate``, ``warmup_steps``, ``w2_coefficient``, ``temperature``,
    ``grad_clip``, ``batch_size``, ``text_prompts``, ``use_wandb``, ``wandb_project``, ``run_name``,
    ``savedir``, ``ref_path``) and any key of our run config (``weight_normalization``, ``num_sampling_steps``,
    ``seed``, ``image_shape``, ``data_range``, ``policy``, ...). ``reward_fn(images [B, C, H, W] in [0, 1])
    -> [B]`` replaces the CLIP reward of ``text_prompts``.
    """

    def __init__(self, model: torch.nn.Module, config: Mapping[str, Any], device: Any, reward_fn: Optional[Callable] = None):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
        run_config(config, reward_fn is not None, 1, 1)  # a bad config fails here, not at train()
        self.model = model
        self.config = dict(config)
        self.device = torch.device(device)
        self.reward_fn = reward_fn
        self.trainer: Any = None  # the round loop, built by the first train()
        model.to(self.device)

    def load_pretrained(self, path: str, key: Optional[str] = None) -> str:
        """Load pretrained weights into the model: torchcfm's checkpoint (``key``, else the config's
        ``checkpoint_key``, else ``ema_model`` when present, else ``net_model``) or a bare state dict.

        The checkpoint's optimizer and scheduler are never restored: fine-tuning starts with a fresh
        optimizer and its warmup. Returns the log line.
        """
        from .models.velocity import load_velocity_weights

        if self.trainer is not None:
            raise RuntimeError("load_pretrained: call it before train(); the reference copy is already taken")
        note = load_velocity_weights(self.model, path, key or self.config.get("checkpoint_key"))
        note += "; its optimizer and scheduler state are not restored (a fresh optimizer, with warmup)"
        logger.info(note)
        return note

    def _build(self, num_rounds: int, steps_per_epoch: int) -> Any:
        from . import build
        from .config import from_dict, validate
        from .models.velocity import VelocityModel
        from .trainer import Trainer

        cfg = from_dict(run_config(self.config, self.reward_fn is not None, num_rounds, steps_per_epoch))
        validate(cfg, model_given=True)
        family = VelocityModel(self.model, cfg.image_shape, cfg.data_range, cfg.null_class, cfg.clip_samples)
        reward = None if self.reward_fn is None else image_reward(self.reward_fn, family.sample_shape[0])
        accelerator = build.make_accelerator(cfg, cpu=self.device.type == "cpu")
        if accelerator.device.type != self.device.type:
            logger.warning("device %s: training on %s (Accelerate's choice)", self.device, accelerator.device)
        return Trainer(cfg, reward_fn=reward, accelerator=accelerator, model=family)

    def train(self, num_epochs: int, steps_per_epoch: int) -> dict[str, Any]:
        """``num_epochs * steps_per_epoch`` steps (rounds of ``batch_size`` samples and one optimizer step);
        the last policy (our sampler) is refreshed every ``steps_per_epoch`` steps. A second call continues
        the same run. Returns the last step's metrics."""
        for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: {value!r} must be a positive integer")
        if self.trainer is None:
            self.trainer = self._build(num_epochs * steps_per_epoch, steps_per_epoch)
        else:
            trainer = self.trainer
            trainer.cfg.sampler_update_interval = steps_per_epoch
            trainer.cfg.num_epochs = trainer.rounds_done + num_epochs * steps_per_epoch
            trainer.start_round = trainer.rounds_done
        metrics = self.trainer.train()
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise FloatingPointError(f"non-finite loss: {metrics['loss']}")
        return metrics

    def checkpoint_dict(self) -> dict[str, Any]:
        """The original's checkpoint keys: ``net_model`` (the trained weights), ``last_policy`` (the
        sampler's), ``optim`` and ``sched`` (this run's state; None before training) and ``config``."""
        from .policies.full import cpu_state_dict

        if self.trainer is None:
            weights = cpu_state_dict(self.model)
            return {"net_model": weights, "last_policy": weights, "optim": None, "sched": None, "config": self.config}
        trainer = self.trainer
        return {
            "net_model": trainer.policy.export_weights(trainer.unwrapped),
            "last_policy": trainer.policy.export_weights(trainer.unwrapped, sampler=True),
            "optim": trainer.optimizer.state_dict(),
            "sched": trainer.lr_scheduler.state_dict(),
            "config": self.config,
        }

    def save_checkpoint(self, path: str) -> None:
        """``torch.save`` of ``checkpoint_dict()``; it loads back with ``torch.load(path, weights_only=True)``.
        With ``policy: lora`` the weights are the adapters merged into the model (its own key names)."""
        import os

        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        torch.save(self.checkpoint_dict(), path)
        logger.info("checkpoint written: %s", path)
