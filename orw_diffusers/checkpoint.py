"""Resumable checkpoints under ``output_dir/checkpoints/``: atomic writes, ``latest``, rotation.

One checkpoint, ``checkpoint-NNNNNN`` (NNNNNN = rounds completed), holds:

- ``pytorch_lora_weights.safetensors``: the trained adapter, diffusers format (``load_lora_weights`` reads it);
- ``sampler/pytorch_lora_weights.safetensors``: the sampler adapter, same format;
- ``trainer_state.json``: the round counter, the prompt cursor, the samples seen, the run config and the
  objective's and the judges' round-to-round state (``TrainerState.states``);
- written by Accelerate's ``save_state``: ``optimizer.bin``, ``scheduler.bin``, ``scaler.pt`` (fp16 only) and
  ``random_states_<rank>.pkl`` (Python, NumPy and torch RNG states of every process).

The frozen base model is never part of a checkpoint. The trainer's save/load hooks (registered with
``accelerator.register_save_state_pre_hook`` / ``register_load_state_pre_hook``) write and read the
adapters and the state file and keep Accelerate from saving the full transformer.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-NNNNNN`` and renamed when complete, so a
process killed mid-write leaves only a temporary directory, which is never taken for ``latest`` and
is removed by the next save. Only torch is imported at module level: the config validation uses this module.
Its keys (``CheckpointKeys``) are declared and checked here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from .errors import ConfigError
from .keys import check_off_or_count, key_field

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
SAMPLER_SUBDIR = "sampler"
TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# diffusers' LoRA files prefix the transformer's keys with the pipeline component name.
_TRANSFORMER_PREFIX = "transformer."


@dataclass
class CheckpointKeys:
    """The run-config keys of resumable checkpoints."""

    checkpointing_steps: Optional[int] = key_field(
        "Save a resumable checkpoint every N rounds (online rounds, as num_epochs counts them; not optimizer "
        "steps), and after the last round, to output_dir/checkpoints/. 0 or null: off.",
        None,
    )
    checkpoints_total_limit: Optional[int] = key_field(
        "Keep at most this many checkpoints; the oldest are deleted first, the newest never. null: keep all.", None
    )
    resume_from_checkpoint: Optional[str] = key_field(
        "Continue a run from a checkpoint directory, a checkpoint name such as 'checkpoint-000010' (in "
        "output_dir/checkpoints/), or 'latest' (the newest complete checkpoint there; a fresh start if there is none).",
        None,
        path=True,
    )


def validate_checkpoint_keys(cfg: Any) -> None:
    """The checkpoint keys against ``output_dir``: what to resume exists, and a fresh run starts in a clean one."""
    check_off_or_count(cfg, "checkpointing_steps")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError(f"checkpoints_total_limit: {cfg.checkpoints_total_limit!r} must be >= 1 (null keeps all)")
    resume = cfg.resume_from_checkpoint
    if resume is not None and resume != "latest" and find_checkpoint(resume, cfg.output_dir) is None:
        names = [os.path.basename(path) for _, path in list_checkpoints(cfg.output_dir)]
        have = f"; {cfg.output_dir!r} holds {', '.join(names)}" if names else ""
        raise ConfigError(
            f"resume_from_checkpoint: {resume!r} is neither 'latest', a checkpoint name in output_dir/checkpoints/ "
            f"(checkpoint-NNNNNN) nor a complete checkpoint directory (holding trainer_state.json){have}"
        )
    # A fresh run must not share checkpoints/ with an earlier one: 'latest' could later pick the old run's.
    if resume is None and list_checkpoints(cfg.output_dir):
        raise ConfigError(
            f"resume_from_checkpoint: output_dir {cfg.output_dir!r} holds checkpoints of an earlier run; "
            f"set resume_from_checkpoint: latest to continue it, or use a new output_dir (or delete its checkpoints/)"
        )


@dataclass
class TrainerState:
    """What the trainer needs besides the tensors to continue a run exactly where it stopped."""

    rounds_done: int  # the next round to run
    prompt_cursor: int  # position in the seeded prompt stream; = rounds_done * prompts_per_round
    samples_seen: int
    config: dict[str, Any] = field(default_factory=dict)  # the run config that wrote the checkpoint
    # JSON state of the loop's stateful parts by name ("objective": an adaptive alpha, "judges": the alarm's window)
    states: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(rounds_done: int) -> str:
    return f"checkpoint-{rounds_done:06d}"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint directory: it holds the state file (temporaries are never named ``checkpoint-N``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_NAME))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as ``(rounds_done, path)``, oldest first; temporaries and strays are skipped."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and is_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def find_checkpoint(value: str, output_dir: str) -> Optional[str]:
    """A complete checkpoint named by ``value``, else None: a checkpoint directory, or a bare name
    ``checkpoint-N`` of ``output_dir/checkpoints/`` (N with or without the leading zeros)."""
    if is_checkpoint(value):
        return value
    match = _NAME.match(value)
    if match is None:
        return None
    rounds = int(match.group(1))
    return next((path for done, path in list_checkpoints(output_dir) if done == rounds), None)


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
    """The config's ``resume_from_checkpoint`` -> a checkpoint directory, or None for a fresh start.

    ``latest`` without any checkpoint starts fresh (so one command both starts and restarts a
    preemptible job); a path or a name must be a complete checkpoint (the config check enforces it).
    """
    if value is None:
        return None
    if value == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("resume_from_checkpoint: latest: no checkpoint in %s yet; starting a new run", output_dir)
        return path
    path = find_checkpoint(value, output_dir)
    if path is None:
        raise FileNotFoundError(f"resume_from_checkpoint: {value!r} is not a complete checkpoint directory or name")
    return path


def write_state(directory: str, state: TrainerState) -> None:
    with open(os.path.join(directory, STATE_NAME), "w") as f:
        json.dump(asdict(state), f, indent=1)


def read_state(directory: str) -> TrainerState:
    with open(os.path.join(directory, STATE_NAME)) as f:
        return TrainerState(**json.load(f))


# --- adapters -----------------------------------------------------------------------------------
def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """A diffusers LoRA file -> peft's adapter-free key names (what ``lora.adapter_state_dict`` returns)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    other = [k for k in tensors if not k.startswith(_TRANSFORMER_PREFIX)]
    if other:
        raise ValueError(f"{path}: only transformer LoRA weights are expected, found e.g. {other[0]!r}")
    return {k[len(_TRANSFORMER_PREFIX) :]: v for k, v in tensors.items()}


# --- atomic save, rotation ----------------------------------------------------------------------
def maybe_save(accelerator: Any, cfg: Any, rounds_done: int) -> Optional[str]:
    """Every ``checkpointing_steps`` rounds and after the last round (so a run can be extended). Every process."""
    steps = cfg.checkpointing_steps
    if not steps or (rounds_done % steps and rounds_done != cfg.num_epochs):
        return None
    t0 = time.perf_counter()
    path = save_checkpoint(accelerator, cfg.output_dir, rounds_done, cfg.checkpoints_total_limit)
    if accelerator.is_main_process:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        logger.info("checkpoint %s: %.1f MB in %.2f s", path, size / 2**20, time.perf_counter() - t0)
    return path


def save_checkpoint(accelerator: Any, output_dir: str, rounds_done: int, total_limit: Optional[int]) -> str:
    """``accelerator.save_state`` into a temporary directory, renamed to ``checkpoint-NNNNNN`` when
    every process has written its part; then rotation. Call on every process. Returns the path."""
    root = checkpoints_root(output_dir)
    final = os.path.join(root, checkpoint_name(rounds_done))
    tmp = os.path.join(root, TMP_PREFIX + checkpoint_name(rounds_done))
    if accelerator.is_main_process:
        remove_temporaries(output_dir)  # leftovers of a write that was killed
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # runs the trainer's save hook (adapters + trainer_state.json)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not is_checkpoint(tmp):
            raise RuntimeError(f"checkpoint {tmp} has no {STATE_NAME}: the trainer's save hook did not run")
        _fsync_tree(tmp)  # the data must be on disk before the rename makes the checkpoint visible
        _replace_dir(tmp, final)
        rotate(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: str, total_limit: Optional[int]) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; the newest one always stays."""
    found = list_checkpoints(output_dir)
    if total_limit is None or len(found) <= total_limit:
        return []
    doomed = [path for _, path in found[: len(found) - max(total_limit, 1)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old checkpoint %s (checkpoints_total_limit=%s)", path, total_limit)
    return doomed


def remove_temporaries(output_dir: str) -> None:
    """Delete interrupted writes (``.tmp-*``, ``.old-*``) under ``checkpoints/``."""
    root = checkpoints_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((TMP_PREFIX, _OLD_PREFIX)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _replace_dir(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``. An existing ``dst`` (a run resumed from an older checkpoint writes
    the same round again) is moved aside first and deleted last, so some complete copy always exists."""
    old = None
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), _OLD_PREFIX + os.path.basename(dst))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    _fsync_dir(os.path.dirname(dst))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: str) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(parent)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- Accelerate's save/load hooks ------------------------------------------------------------------
# Keys that may change when resuming without making the run differ from an uninterrupted one.
RESUME_FREE_KEYS = {
    "resume_from_checkpoint", "num_epochs", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "sample_log_interval", "validation_prompts", "validation_interval", "per_prompt_log_max",
    "push_to_hub", "hub_model_id", "hub_private", "log_sample_rewards",
    "eval_reward", "hacking_window", "hacking_min_rise", "hacking_min_drop", "stop_on_reward_hacking",
}  # fmt: skip


class StateHooks:
    """Accelerate's save_state / load_state pre-hooks: the policy's weights and the trainer state.

    ``save_state`` then writes the optimizer, scheduler, scaler and RNG states itself. Emptying its
    ``weights`` / ``models`` lists keeps it from writing the full denoiser (gigabytes of frozen
    weights) into every checkpoint.
    ``state`` returns the ``TrainerState`` to write; ``rounds_done`` and ``states`` hold the restored round
    counter and ``TrainerState.states``.
    """

    def __init__(self, accelerator: Any, policy: Any, model: Any, module: Any, state: Any, config: dict[str, Any]):
        self.accelerator, self.policy, self.model, self.module = accelerator, policy, model, module
        self.state, self.config = state, config
        self.rounds_done = 0
        self.states: dict[str, Any] = {}
        accelerator.register_save_state_pre_hook(self.save_hook)
        accelerator.register_load_state_pre_hook(self.load_hook)

    def save_hook(self, models: list, weights: list, directory: str) -> None:
        weights.clear()
        if self.accelerator.is_main_process:
            self.policy.save_checkpoint(directory, self.model, self.module())
            write_state(directory, self.state())

    def load_hook(self, models: list, directory: str) -> None:
        """Every process: the policy's weights and the round counter."""
        models.clear()  # nothing of the frozen model is in a checkpoint
        self.policy.load_checkpoint(directory, self.model, self.module())
        state = read_state(directory)
        self.rounds_done, self.states = state.rounds_done, state.states
        if self.accelerator.is_main_process:
            now = self.config
            changed = [k for k in now if k not in RESUME_FREE_KEYS and k in state.config and state.config[k] != now[k]]
            for key in changed:
                logger.warning(
                    "resuming with %s=%r, the checkpoint was written with %r: the run will differ from an "
                    "uninterrupted one",
                    key, now[key], state.config[key],
                )  # fmt: skip
