"""The model card of a finished run: ``output_dir/README.md``, written from the run's files on disk.

Everything here reads ``config.yaml``, ``metrics.jsonl``, ``samples/*.png`` and the weights, so the card
can be (re)written long after training: ``python -m orw_diffusers.push OUTPUT_DIR``. The upload is in
``hub.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .models.velocity import VELOCITY_KIND, WEIGHTS_KIND_KEY, WEIGHTS_MODULE_KEY
from .objectives import objective_class
from .weight_files import FULL_WEIGHTS_NAME, LORA_WEIGHTS_NAME, VELOCITY_LORA_NAME, WEIGHT_FILES

CARD_NAME = "README.md"
#: diffusers' LoRA training scripts tag their cards ``diffusers-training``, ``lora`` and ``template:sd-lora``
CARD_TAGS = ["text-to-image", "diffusers", "diffusers-training", "lora", "template:sd-lora"]
#: a pipeline class (``model_index.json``'s ``_class_name``) -> the family's Hub tags
FAMILY_TAGS = {"StableDiffusion3Pipeline": ["sd3"], "FluxPipeline": ["flux"]}
#: at most this many validation grids in the card's widget gallery (the first, the last, evenly between)
WIDGET_MAX_IMAGES = 4


@dataclass(frozen=True)
class SavedWeights:
    """The weights file of a finished run and what it holds (read from its safetensors metadata)."""

    file: str  # its name in output_dir, one of WEIGHT_FILES
    velocity: bool  # a plain velocity model's (else a pipeline denoiser's)
    lora: bool  # an adapter (else every weight)
    module_class: Optional[str] = None  # a velocity model's class, e.g. torchcfm.models.unet.unet.UNetModelWrapper


#: a pipeline's LoRA: what a run's card describes when its output_dir holds no weights yet
PIPELINE_LORA = SavedWeights(LORA_WEIGHTS_NAME, velocity=False, lora=True)


def saved_weights(output_dir: str) -> Optional[SavedWeights]:
    """The run's weights in ``output_dir`` (the first of ``WEIGHT_FILES`` present), or None."""
    from safetensors import safe_open

    for name in WEIGHT_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            try:
                with safe_open(path, "pt") as f:
                    meta = f.metadata() or {}
            except Exception:  # noqa: BLE001 - unreadable header: the file's name still says what it is
                meta = {}
            velocity = name == VELOCITY_LORA_NAME or meta.get(WEIGHTS_KIND_KEY) == VELOCITY_KIND
            return SavedWeights(name, velocity, name != FULL_WEIGHTS_NAME, meta.get(WEIGHTS_MODULE_KEY))
    return None


def load_hint(weights: SavedWeights, repo_id: str) -> str:
    """One line: how to load the weights pushed to ``repo_id``."""
    if not weights.velocity and weights.lora:
        return f"pipe.load_lora_weights({repo_id!r})"
    return f"hf_hub_download({repo_id!r}, {weights.file!r}) (usage in the model card)"


@dataclass
class RunSummary:
    """What the model card says about a run, read from its output directory."""

    base_model: str
    reward: Any
    objective: str  # the run's ``objective``: the card's title, text and settings rows are the objective's
    rounds: int
    samples_seen: int
    first_reward: Optional[float] = None
    final_reward: Optional[float] = None
    final_reward_std: Optional[float] = None
    final_diversity: Optional[float] = None
    image: Optional[str] = None  # path relative to output_dir of the grid shown on the card
    example_prompt: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)
    #: (rounds trained, path relative to output_dir) of the validation grids in the widget gallery
    validation_images: list[tuple[int, str]] = field(default_factory=list)
    validation_prompts: list[str] = field(default_factory=list)
    #: ``license`` (and ``license_name`` / ``license_link``) from the base model's card; {} when unknown
    license: dict[str, str] = field(default_factory=dict)
    family_tags: list[str] = field(default_factory=list)
    weights: SavedWeights = PIPELINE_LORA


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


def validation_images(output_dir: str, limit: int = WIDGET_MAX_IMAGES) -> list[tuple[int, str]]:
    """(rounds trained, path relative to ``output_dir``) of up to ``limit`` of ``samples/validation_XXXX.png``:
    the first, the newest and evenly spaced ones between, newest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "samples", "validation_*.png")):
        match = re.fullmatch(r"validation_(\d+)\.png", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), os.path.relpath(path, output_dir)))
    found.sort()
    if len(found) > limit > 1:
        picks = sorted({round(i * (len(found) - 1) / (limit - 1)) for i in range(limit)})
        found = [found[i] for i in picks]
    return found[::-1]


def family_tags(base: str) -> list[str]:
    """The model family's Hub tags: from a local pipeline's ``model_index.json`` class, else from the name
    (``sd3``, plus ``sd3.5`` when the name says 3.5; ``flux``). [] for a family we cannot tell."""
    class_name = None
    index = os.path.join(base, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                class_name = json.load(f).get("_class_name")
        except (OSError, ValueError):
            class_name = None
    name = (base if _is_hub_id(base) else os.path.basename(os.path.normpath(base))).lower().replace("_", "-")
    tags = list(FAMILY_TAGS.get(class_name, []))
    if not tags and ("stable-diffusion-3" in name or "sd3" in name):
        tags = ["sd3"]
    if not tags and "flux" in name:
        tags = ["flux"]
    if "sd3" in tags and re.search(r"3[.-]5|sd35", name):
        tags.append("sd3.5")
    return tags


def base_model_license(base: str) -> dict[str, str]:
    """``license`` (+ ``license_name``, ``license_link``) from the base model's card: a local directory's
    ``README.md``, or ``ModelCard.load`` of a Hub id. {} when there is no card or it cannot be read (offline,
    gated, no license field): the model card then asks the user to set the license."""
    from huggingface_hub import ModelCard

    is_hub = _is_hub_id(base)
    readme = os.path.join(base, "README.md")
    if not is_hub and not os.path.isfile(readme):
        return {}
    try:
        data = ModelCard.load(base if is_hub else readme).data.to_dict()
    except Exception:  # noqa: BLE001 - offline, gated, no card, a malformed card: fall back to asking
        return {}
    if not isinstance(data.get("license"), str):
        return {}
    out = {k: str(data[k]) for k in ("license", "license_name", "license_link") if isinstance(data.get(k), str)}
    link = out.get("license_link", "")
    if link and not link.startswith(("http://", "https://")):  # relative to the base repo: make it absolute
        if is_hub:
            out["license_link"] = f"https://huggingface.co/{base}/blob/main/{link.lstrip('./')}"
        else:
            del out["license_link"]
    return out


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
    weights = saved_weights(output_dir) or PIPELINE_LORA
    if weights.velocity:  # not a pipeline: pretrained_model_name_or_path was not read
        base = str(config.get("model_factory") or weights.module_class or "a velocity model")
    else:
        base = str(config.get("pretrained_model_name_or_path", "unknown"))
    return RunSummary(
        base_model=base,
        reward=config.get("reward"),
        objective=str(config.get("objective", "orw_cfm_w2")),
        rounds=int(last["epoch"]) + 1 if "epoch" in last else 0,
        samples_seen=int(last.get("samples_seen", 0)),
        first_reward=rows[0].get("reward_mean") if rows else None,
        final_reward=last.get("reward_mean"),
        final_reward_std=last.get("reward_std"),
        final_diversity=last.get("diversity"),
        image=card_image(output_dir),
        example_prompt=prompts[0] if prompts else None,
        config=config,
        validation_images=validation_images(output_dir),
        validation_prompts=list(config.get("validation_prompts") or []),
        license={} if weights.velocity else base_model_license(base),
        family_tags=[] if weights.velocity else family_tags(base),
        weights=weights,
    )


def _is_hub_id(name: str) -> bool:
    from .digits.data import DIGITS_MODEL_NAME  # the embedded digits base: a local build, not a Hub model

    return (
        name != DIGITS_MODEL_NAME and not os.path.exists(name) and name.count("/") == 1
        and not name.startswith((".", "/", "~"))
    )


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"


def _reward_text(reward: Any) -> str:
    if isinstance(reward, str):
        return reward
    return yaml.safe_dump(reward, default_flow_style=True, sort_keys=False).strip()


def _widget(summary: RunSummary) -> list[dict[str, Any]]:
    """The card's gallery, diffusers' LoRA-card form ``[{text, output: {url}}]``: the validation grids
    (newest first, each with its prompts), else the card's one image with the example prompt."""
    prompts = "; ".join(summary.validation_prompts)
    if summary.validation_images and prompts:
        return [
            {"text": f"{'base model' if rounds == 0 else f'after {rounds} rounds'}: {prompts}", "output": {"url": path}}
            for rounds, path in summary.validation_images
        ]
    if summary.image:
        return [{"text": summary.example_prompt or "", "output": {"url": summary.image}}]
    return []


def model_card(summary: RunSummary, repo_id: Optional[str], output_dir: str) -> Any:
    """A ``huggingface_hub.ModelCard``. Metadata: ``library_name: diffusers``, ``base_model``, the license
    inherited from the base model's card, the tags of diffusers' LoRA cards and the family's (``sd3``,
    ``sd3.5``, ``flux``), a ``widget`` gallery of the validation grids; for a plain velocity model, its
    class and no pipeline. Body: the method's settings, the final reward and diversity, a sample grid and
    the loading snippet of the run's weights (``summary.weights``)."""
    from huggingface_hub import ModelCard, ModelCardData

    base, weights, method = summary.base_model, summary.weights, objective_class(summary.objective)
    base_is_hub = not weights.velocity and _is_hub_id(base)
    what = "LoRA adapter" if weights.lora else "fine-tune"
    if weights.velocity:
        tags = [method.card_tag, "flow-matching", "pytorch"] + (["lora"] if weights.lora else [])
        data = ModelCardData(pipeline_tag="unconditional-image-generation", tags=tags, widget=_widget(summary) or None)
    else:
        tags = list(CARD_TAGS if weights.lora else [t for t in CARD_TAGS if t not in ("lora", "template:sd-lora")])
        tags += [t for t in [method.card_tag, *summary.family_tags] if t not in tags]
        data = ModelCardData(
            base_model=base if base_is_hub else None,  # the Hub rejects a local path here
            library_name="diffusers",
            pipeline_tag="text-to-image",
            tags=tags,
            widget=_widget(summary) or None,
            **summary.license,
        )
    base_link = f"[{base}](https://huggingface.co/{base})" if base_is_hub else f"`{base}`"
    if summary.license:
        license_note = f"License: `{summary.license['license']}`, inherited from the base model's card."
    else:
        license_note = (
            f"License: **not set**. The base model's license terms apply to this {what}: add a `license:` "
            "to this card's metadata (and `license_name` / `license_link` for `other`), as on the base model's card."
        )
    reward_change = f"{_fmt(summary.first_reward)} → {_fmt(summary.final_reward)}"
    if summary.final_reward_std is not None:
        reward_change += f" (± {_fmt(summary.final_reward_std)} over the last round's samples)"
    cfg = summary.config
    size = ("image_shape", "num_sampling_steps", "guidance_scale") if weights.velocity else (
        "resolution", "num_sampling_steps", "guidance_scale")  # fmt: skip
    rows = [
        ("base model", base_link),
        ("reward", f"`{_reward_text(summary.reward)}`"),
        ("objective", f"{method.title} (`{summary.objective}`)"),
        *method.card_rows(cfg),
        ("rounds", str(summary.rounds)),
        ("samples seen", str(summary.samples_seen)),
        ("mean reward, first → last round", reward_change),
        ("diversity, last round", _fmt(summary.final_diversity)),
        ("LoRA rank / learning rate" if weights.lora else "policy / learning rate",
         f"{cfg.get('rank', '—') if weights.lora else 'full fine-tuning'} / {cfg.get('learning_rate', '—')}"),
        (" / ".join(k.replace("_", " ") for k in size), " / ".join(str(cfg.get(k, "—")) for k in size)),
    ]  # fmt: skip
    rows += staying_close_rows(cfg, read_metrics(output_dir))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    image = f"\n![samples]({summary.image})\n" if summary.image else ""
    trained = "adapter" if weights.lora else "model's weights"
    holds = {
        (False, True): f"A LoRA adapter for {base_link}",
        (False, False): f"The transformer of {base_link}, every weight",
        (True, True): f"A LoRA adapter (peft) for the velocity model {base_link}",
        (True, False): f"The velocity model {base_link}, every weight",
    }[(weights.velocity, weights.lora)]
    body = f"""
# {method.title} {what} of {base}

{holds} fine-tuned online towards a reward with **{method.title}**
{method.card_text.format(trained=trained)} Trained with `orw-diffusers`.

{license_note}
{image}
## Training

{table}

Diversity is the mean pairwise distance of a round's samples (in the reward model's embedding space
when it has one, else in latent space). The full run config is in `config.yaml`, per-round metrics
in `metrics.jsonl`.

## Use

```python
{usage_snippet(summary, repo_id, output_dir)}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def staying_close_rows(config: dict[str, Any], metrics: list[dict]) -> list[tuple[str, str]]:
    """The card's rows for the W2 budget (``w2_target`` and the last round's alpha), each held-out judge
    (``eval/<name>_mean``, first -> last round) and the reward-hacking alarm; [] for a run without them."""
    if not metrics:
        return []
    first, last = metrics[0], metrics[-1]
    rows = []
    if config.get("w2_target") is not None:
        rows.append(("`w2_target` (W2 budget) / alpha in the last round",
                     f"{_fmt(config['w2_target'])} / {_fmt(last.get('w2_coefficient'))}"))  # fmt: skip
    for key in [k for k in last if k.startswith("eval/") and k.endswith("_mean")]:
        name = key[len("eval/") : -len("_mean")]
        rows.append((f"held-out `{name}` (eval_reward), first → last round", f"{_fmt(first.get(key))} → {_fmt(last[key])}"))
    fired = [row["epoch"] for row in metrics if row.get("hacking_alarm")]
    if "hacking_alarm" in last:
        stopped = ", the run stopped there" if fired and config.get("stop_on_reward_hacking") else ""
        rows.append(("reward-hacking alarm", f"raised in round {fired[0]}{stopped}" if fired else "not raised"))
    return rows


def usage_snippet(summary: RunSummary, repo_id: Optional[str], output_dir: str) -> str:
    """Python that loads the run's weights from ``repo_id`` (else from the local ``output_dir``)."""
    base, weights = summary.base_model, summary.weights
    prompt = (summary.example_prompt or "a photo of a cat").replace('"', '\\"')
    if not weights.velocity and weights.lora:
        return "\n".join([
            "import torch", "from diffusers import DiffusionPipeline", "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")',
            f'pipe.load_lora_weights("{repo_id or os.path.abspath(output_dir)}")',
            f'image = pipe("{prompt}").images[0]',
        ])  # fmt: skip
    if repo_id:
        imports, path = ["from huggingface_hub import hf_hub_download"], f'hf_hub_download("{repo_id}", "{weights.file}")'
    else:
        imports, path = [], repr(os.path.join(os.path.abspath(output_dir), weights.file))
    if not weights.velocity:  # every weight of a pipeline's transformer
        return "\n".join([
            "import torch", "from diffusers import DiffusionPipeline", *imports, "from safetensors.torch import load_file", "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}", dtype=torch.bfloat16)',
            f"pipe.transformer.load_state_dict(load_file({path}))", 'pipe.to("cuda")',
            f'image = pipe("{prompt}").images[0]',
        ])  # fmt: skip
    build = f"model = ...  # the module as it was built for training: {base}"
    if weights.lora:
        return "\n".join([*imports, "from orw_diffusers.models.velocity import load_lora_adapter", "",
                          build + ", with its pretrained weights", f"load_lora_adapter(model, {path})"])  # fmt: skip
    return "\n".join([*imports, "from safetensors.torch import load_file", "", build,
                      f"model.load_state_dict(load_file({path}))"])  # fmt: skip


def write_model_card(output_dir: str, repo_id: Optional[str] = None) -> str:
    """Write ``output_dir/README.md`` from the run's files; the snippet loads ``repo_id`` (else the local dir)."""
    path = os.path.join(output_dir, CARD_NAME)
    model_card(summarize_run(output_dir), repo_id, output_dir).save(path)
    return path
