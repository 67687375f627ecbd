"""The model card and the Hub upload of a finished run.

Everything here reads the run's files on disk (``config.yaml``, ``metrics.jsonl``,
``samples/*.png``, the weights), so the card can be (re)written and the upload retried long after
training: ``python -m orw_diffusers.push OUTPUT_DIR --hub_model_id ...``.

The Hub token is never handled here: ``huggingface_hub`` reads it from ``HF_TOKEN`` or from
``huggingface-cli login``. The API object can be injected (tests pass a fake that records calls).
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .checkpoint import LORA_WEIGHTS_NAME

CARD_NAME = "README.md"
CARD_TAGS = ["diffusers", "lora", "orw-cfm-w2", "text-to-image"]
#: files of output_dir that go to the Hub; checkpoints/, logs/ and all but one sample grid stay local
UPLOADED_FILES = [LORA_WEIGHTS_NAME, CARD_NAME, "config.yaml", "metrics.jsonl"]
#: exit status of the training script and of ``orw_diffusers.push`` when the upload fails
UPLOAD_FAILED_EXIT_CODE = 3


class HubUploadError(RuntimeError):
    """The upload failed; the files are still on disk and the message ends with the retry command."""


@dataclass
class RunSummary:
    """What the model card says about a run, read from its output directory."""

    base_model: str
    reward: Any
    w2_coefficient: Optional[float]
    temperature: Optional[float]
    rounds: int
    samples_seen: int
    first_reward: Optional[float] = None
    final_reward: Optional[float] = None
    final_reward_std: Optional[float] = None
    final_diversity: Optional[float] = None
    image: Optional[str] = None  # path relative to output_dir of the grid shown on the card
    example_prompt: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)


def read_metrics(output_dir: str) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (one per round), or [] if it has none."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def card_image(output_dir: str) -> Optional[str]:
    """The newest validation grid, else the newest sample grid, relative to ``output_dir``."""
    for pattern in ("validation_*.png", "round_*.png"):
        found = sorted(glob.glob(os.path.join(output_dir, "samples", pattern)))
        if found:
            return os.path.relpath(found[-1], output_dir)
    return None


def summarize_run(output_dir: str) -> RunSummary:
    """Read ``config.yaml``, ``metrics.jsonl`` and ``samples/`` of a run."""
    config_path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{output_dir!r} has no config.yaml: not the output_dir of a training run")
    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    rows = read_metrics(output_dir)
    last = rows[-1] if rows else {}
    prompts = config.get("validation_prompts") or config.get("prompts") or []
    return RunSummary(
        base_model=str(config.get("pretrained_model_name_or_path", "unknown")),
        reward=config.get("reward"),
        w2_coefficient=config.get("w2_coefficient"),
        temperature=config.get("temperature"),
        rounds=int(last["epoch"]) + 1 if "epoch" in last else 0,
        samples_seen=int(last.get("samples_seen", 0)),
        first_reward=rows[0].get("reward_mean") if rows else None,
        final_reward=last.get("reward_mean"),
        final_reward_std=last.get("reward_std"),
        final_diversity=last.get("diversity"),
        image=card_image(output_dir),
        example_prompt=prompts[0] if prompts else None,
        config=config,
    )


def _is_hub_id(name: str) -> bool:
    return not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"


def _reward_text(reward: Any) -> str:
    if isinstance(reward, str):
        return reward
    return yaml.safe_dump(reward, default_flow_style=True, sort_keys=False).strip()


def model_card(summary: RunSummary, repo_id: Optional[str], output_dir: str) -> Any:
    """A ``huggingface_hub.ModelCard``: metadata (``library_name: diffusers``, tags, base model) and a body
    with the method's settings, the final reward and diversity, a sample grid and the loading snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    base = summary.base_model
    base_is_hub = _is_hub_id(base)
    data = ModelCardData(
        base_model=base if base_is_hub else None,  # the Hub rejects a local path here
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(CARD_TAGS),
    )
    where = repo_id or os.path.abspath(output_dir)
    base_link = f"[{base}](https://huggingface.co/{base})" if base_is_hub else f"`{base}`"
    reward_change = f"{_fmt(summary.first_reward)} → {_fmt(summary.final_reward)}"
    if summary.final_reward_std is not None:
        reward_change += f" (± {_fmt(summary.final_reward_std)} over the last round's samples)"
    cfg = summary.config
    rows = [
        ("base model", base_link),
        ("reward", f"`{_reward_text(summary.reward)}`"),
        ("`w2_coefficient` (alpha)", _fmt(summary.w2_coefficient)),
        ("`temperature` (tau)", _fmt(summary.temperature)),
        ("rounds", str(summary.rounds)),
        ("samples seen", str(summary.samples_seen)),
        ("mean reward, first → last round", reward_change),
        ("diversity, last round", _fmt(summary.final_diversity)),
        ("LoRA rank / learning rate", f"{cfg.get('rank', '—')} / {cfg.get('learning_rate', '—')}"),
        ("resolution / sampling steps / guidance", " / ".join(
            str(cfg.get(k, "—")) for k in ("resolution", "num_sampling_steps", "guidance_scale")
        )),
    ]  # fmt: skip
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    image = f"\n![samples]({summary.image})\n" if summary.image else ""
    prompt = (summary.example_prompt or "a photo of a cat").replace('"', '\\"')
    body = f"""
# ORW-CFM-W2 LoRA for {base}

A LoRA adapter for {base_link}, fine-tuned online towards a reward with **ORW-CFM-W2** (Online
Reward-Weighted Conditional Flow Matching with Wasserstein-2 regularisation; Fan et al., ICLR 2025)
using `orw-diffusers`. Each round the current model sampled images, the reward
scored them, and the adapter was fitted to its own samples weighted by `exp(temperature * reward)`,
with a W2 term (`w2_coefficient`) keeping it close to the base model.
{image}
## Training

{table}

Diversity is the mean pairwise distance of a round's samples (in the reward model's embedding space
when it has one, else in latent space). The full run config is in `config.yaml`, per-round metrics
in `metrics.jsonl`.

## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{where}")
image = pipe("{prompt}").images[0]
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(output_dir: str, repo_id: Optional[str] = None) -> str:
    """Write ``output_dir/README.md`` from the run's files; the snippet loads ``repo_id`` (else the local dir)."""
    path = os.path.join(output_dir, CARD_NAME)
    model_card(summarize_run(output_dir), repo_id, output_dir).save(path)
    return path


def retry_command(output_dir: str, repo_id: str, private: bool = False) -> str:
    cmd = f"python -m orw_diffusers.push {shlex.quote(output_dir)} --hub_model_id {shlex.quote(repo_id)}"
    return cmd + (" --private" if private else "")


def upload_patterns(output_dir: str) -> list[str]:
    """The files of ``output_dir`` that are uploaded: the weights, the card, the config, the metrics
    and the card's image (if any)."""
    image = card_image(output_dir)
    return UPLOADED_FILES + ([image] if image else [])


def push_to_hub(output_dir: str, repo_id: str, private: bool = False, api: Any = None) -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder`` of the files in ``upload_patterns``.

    The weights and the card must already be on disk. Any failure raises ``HubUploadError`` whose
    message ends with the command that retries; nothing local is touched. Returns the repo id.
    """
    weights = os.path.join(output_dir, LORA_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist: nothing to push")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the login cache, never from us
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        resolved = getattr(url, "repo_id", None) or repo_id  # 'name' resolves to 'user/name'
        summary = summarize_run(output_dir)
        api.upload_folder(
            repo_id=resolved,
            folder_path=output_dir,
            allow_patterns=upload_patterns(output_dir),
            commit_message=f"ORW-CFM-W2 LoRA: {summary.rounds} rounds, {summary.samples_seen} samples",
        )
    except Exception as e:  # network, auth, quota, ...: all leave the files on disk and say how to retry
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise HubUploadError(
            f"upload of {output_dir} to the Hub repo {repo_id!r} failed ({reason}). The weights and the model "
            f"card are on disk in {output_dir}. Retry with: {retry_command(output_dir, repo_id, private)}"
        ) from e
    return resolved


def publish(cfg: Any, summary: str, api: Any = None) -> None:
    """After the weights are saved (main process): the model card, the Hub upload if asked, and ``summary``.

    A failed upload prints the retry command and raises ``HubUploadError`` (the run exits non-zero);
    the weights and the card are on disk either way.
    """
    write_model_card(cfg.output_dir, cfg.hub_model_id if cfg.push_to_hub else None)
    where = ""
    if cfg.push_to_hub:
        try:
            repo_id = push_to_hub(cfg.output_dir, cfg.hub_model_id, private=cfg.hub_private, api=api)
        except HubUploadError as e:
            print(f"error: {e}", file=sys.stderr)
            raise
        where = f"; on the Hub as {repo_id}: pipe.load_lora_weights({repo_id!r})"
    print(summary + where)
