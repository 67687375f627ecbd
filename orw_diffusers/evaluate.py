"""Evaluation report: the base model and the fine-tuned LoRA from the same seeds, side by side.

    python -m orw_diffusers.evaluate --base stabilityai/stable-diffusion-3.5-medium --lora outputs/run \
        --prompts "a red fox in the snow" "a lighthouse at dusk" --reward clip_score \
        [--eval_reward pickscore] [--num_images_per_prompt 4] [--seed 0] [--output_dir eval] [--num_inference_steps 28] \
        [--guidance_scale 4.5] [--resolution 512] [--max_sequence_length 256]

Writes to ``--output_dir``: ``comparison.png`` (per prompt, a row of base images labelled "i base"
above the fine-tuned images from the same seeds, "i fine-tuned"; each captioned with its reward), ``report.md`` and ``report.json`` (reward mean ± std per
reward, the held-out judges of ``--eval_reward`` (default: the run's ``eval_reward``), diversity, and each
prompt's mean reward base -> fine-tuned) and, when the LoRA directory has
a ``metrics.jsonl``, ``curves.png`` (reward and W2 curves of the run). The markdown table is also printed.

Only plain diffusers is used (``DiffusionPipeline.from_pretrained`` + ``load_lora_weights``), so the
numbers are what a user of the published weights gets. Bad arguments exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import yaml

from .card import read_metrics
from .images import image_grid, mean_pairwise_distance, plot_curves, save_image
from .dtypes import DTYPE_NAMES, named_dtype
from .errors import ConfigError
from .weight_files import LORA_WEIGHTS_NAME

class EvalError(ValueError):
    """A bad argument; one line, exit code 2."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orw_diffusers.evaluate", description="Base vs fine-tuned report.")
    p.add_argument("--base", required=True, help="hub id or local directory of the base diffusers pipeline")
    p.add_argument("--lora", required=True, help="a run's output_dir, a checkpoint directory, or a Hub repo id")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to render")
    p.add_argument("--prompt_file", default=None, help="a .txt file, one prompt per line (instead of --prompts)")
    p.add_argument(
        "--reward",
        required=True,
        help="reward spec as in the run config (YAML), e.g. clip_score or '{clip_score: 1, aesthetic: 0.5}'",
    )
    p.add_argument(
        "--eval_reward",
        default=None,
        help="held-out rewards (the reward syntax), reported apart; default: the run's eval_reward (its config.yaml)",
    )
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument(
        "--seed", type=int, default=0, help="image j of prompt i uses seed (seed, i, j) for base and fine-tuned"
    )
    p.add_argument("--output_dir", default="orw-eval")
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 length (SD3); default: the pipeline's")
    p.add_argument("--revision", default=None, help="revision of --base")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--reward_device", default=None, help="default: --device")
    p.add_argument("--reward_batch_size", type=int, default=32)
    return p.parse_args(argv)


def _prompts(args: argparse.Namespace) -> list[str]:
    if bool(args.prompts) == bool(args.prompt_file):
        raise EvalError("give exactly one of --prompts and --prompt_file")
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise EvalError(f"--prompt_file: {args.prompt_file!r} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = [p for p in args.prompts if p.strip()]
    if not prompts:
        raise EvalError("no prompts given")
    return prompts


def _check(args: argparse.Namespace) -> None:
    for name in ("num_images_per_prompt", "num_inference_steps", "resolution", "reward_batch_size"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name}: {getattr(args, name)} must be >= 1")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise EvalError(f"--max_sequence_length: {args.max_sequence_length} must be >= 1")
    if args.guidance_scale < 0:
        raise EvalError(f"--guidance_scale: {args.guidance_scale} must be >= 0")
    looks_local = args.lora.startswith((".", "/", "~")) or args.lora.count("/") != 1
    if looks_local and not os.path.isdir(args.lora):
        raise EvalError(f"--lora: {args.lora!r} is neither a directory nor a Hub repo id like 'user/name'")


# --- pipeline ----------------------------------------------------------------------------------
def load_pipeline(base: str, dtype: torch.dtype, device: str, revision: Optional[str] = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` with the components saved as null passed as None, on ``device``."""
    from .models.pipeline import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(base, revision=revision, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_lora(pipe: Any, lora: str) -> None:
    """A directory holding our weight file (an output_dir or a checkpoint), or a Hub repo id."""
    if os.path.isdir(lora) and os.path.isfile(os.path.join(lora, LORA_WEIGHTS_NAME)):
        pipe.load_lora_weights(lora, weight_name=LORA_WEIGHTS_NAME)
    else:
        pipe.load_lora_weights(lora)


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], n: int, seed: int, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major; image j of prompt i from generator (seed, i, j)."""
    from .flow import sample_generator
    from .progress import progress_bar

    out = []
    for i, prompt in enumerate(progress_bar(prompts, desc="generating", leave=False)):
        generators = [sample_generator(seed, i, j) for j in range(n)]
        result = pipe(prompt=prompt, num_images_per_prompt=n, generator=generators, output_type="pt", **call_kwargs)
        out.append(result.images.float().cpu())
    return torch.cat(out)


# --- scoring -------------------------------------------------------------------------------------
@dataclass
class Scored:
    total: torch.Tensor  # [N]
    components: dict[str, torch.Tensor]  # name -> [N]
    diversity: float


def score(reward: Any, images: torch.Tensor, prompts_per_image: list[str], batch_size: int) -> Scored:
    """Rewards of every image, and the diversity: the mean pairwise distance in the reward's
    embedding space (``reward.embed``) when it has one, else between the images' pixels."""
    totals, comps, feats = [], {}, []
    embed = getattr(reward, "embed", None)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        out = reward(batch, prompts_per_image[start : start + batch_size])
        totals.append(out.rewards)
        for name, values in out.components.items():
            comps.setdefault(name, []).append(values)
        feats.append(torch.as_tensor(embed(batch)).float().cpu() if callable(embed) else batch.reshape(len(batch), -1))
    return Scored(
        total=torch.cat(totals),
        components={k: torch.cat(v) for k, v in comps.items()},
        diversity=mean_pairwise_distance(torch.cat(feats)).item(),
    )


def _stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": values.mean().item(), "std": values.std(unbiased=False).item()}


def _compare(base: Scored, tuned: Scored) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {"base": _stats(base.components[name]), "tuned": _stats(tuned.components[name])}
            for name in base.components}  # fmt: skip


def build_report(args: argparse.Namespace, prompts: list[str], base: Scored, tuned: Scored, space: str,
                 held_out: Optional[tuple[Scored, Scored]] = None) -> dict:  # fmt: skip
    n = args.num_images_per_prompt
    rewards = _compare(base, tuned)
    if len(base.components) > 1:
        rewards["total"] = {"base": _stats(base.total), "tuned": _stats(tuned.total)}
    per_prompt = []
    for i, prompt in enumerate(prompts):
        rows = slice(i * n, (i + 1) * n)  # images are prompt-major
        per_prompt.append(
            {"prompt": prompt, "base": base.total[rows].mean().item(), "tuned": tuned.total[rows].mean().item()}
        )
    return {
        "base_model": args.base,
        "lora": args.lora,
        "seed": args.seed,
        "num_images_per_prompt": n,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "prompts": prompts,
        "rewards": rewards,
        "held_out": _compare(*held_out) if held_out else {},
        "diversity": {"base": base.diversity, "tuned": tuned.diversity, "space": space},
        "per_prompt": per_prompt,
        "files": {"grid": "comparison.png", "curves": None},
    }


def report_markdown(report: dict) -> str:
    def pm(s: dict) -> str:
        return f"{s['mean']:.4g} ± {s['std']:.3g}"

    lines = [
        f"# Evaluation: `{report['lora']}` on `{report['base_model']}`",
        "",
        f"{report['num_images_per_prompt']} images per prompt, seed {report['seed']}, "
        f"{report['num_inference_steps']} steps, guidance {report['guidance_scale']}, {report['resolution']} px. "
        "Base and fine-tuned start from the same noise.",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---|---|---|",
    ]
    for name, s in report["rewards"].items():
        delta = s["tuned"]["mean"] - s["base"]["mean"]
        lines.append(f"| reward `{name}` | {pm(s['base'])} | {pm(s['tuned'])} | {delta:+.4g} |")
    for name, s in report.get("held_out", {}).items():
        delta = s["tuned"]["mean"] - s["base"]["mean"]
        lines.append(f"| held-out `{name}` | {pm(s['base'])} | {pm(s['tuned'])} | {delta:+.4g} |")
    d = report["diversity"]
    lines.append(f"| diversity ({d['space']}) | {d['base']:.4g} | {d['tuned']:.4g} | {d['tuned'] - d['base']:+.4g} |")
    lines += [
        "",
        "## Mean reward per prompt (rows `i base` / `i fine-tuned` of comparison.png)",
        "",
        "| i | prompt | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for i, row in enumerate(report["per_prompt"]):
        lines.append(f"| {i} | {row['prompt']} | {row['base']:.4g} | {row['tuned']:.4g} |")
    lines += ["", "![base | fine-tuned](comparison.png)"]
    if report["files"]["curves"]:
        lines += ["", "## Training curves", "", f"![curves]({report['files']['curves']})"]
    return "\n".join(lines) + "\n"


def held_out_spec(args: argparse.Namespace) -> Any:
    """``--eval_reward`` (YAML, checked), else the ``eval_reward`` of the run's ``config.yaml`` in ``--lora``, else None."""
    from .rewards import parse_reward_spec

    if args.eval_reward is None:
        path = os.path.join(args.lora, "config.yaml")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return (yaml.safe_load(f) or {}).get("eval_reward")
    try:
        spec = yaml.safe_load(args.eval_reward)
    except yaml.YAMLError:
        spec = args.eval_reward
    try:
        parse_reward_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"--eval_reward: {str(e).removeprefix('reward: ')}") from None
    return spec


def find_metrics(lora: str) -> Optional[list[dict]]:
    """The run's ``metrics.jsonl``: in the LoRA directory, in the run above a checkpoint directory, or
    in the Hub repo (skipped quietly when offline)."""
    candidates = [os.path.join(lora, "metrics.jsonl")]
    if os.path.basename(os.path.dirname(os.path.abspath(lora))) == "checkpoints":
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(lora))), "metrics.jsonl"))
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None and not os.path.isdir(lora):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(lora, "metrics.jsonl")
        except Exception:  # no such file, offline, private: the curves are optional
            path = None
    return None if path is None else read_metrics(os.path.dirname(path))


def main(argv: Optional[list[str]] = None) -> int:
    from .rewards import build_reward, parse_reward_spec

    args = parse_args(argv)
    try:
        prompts = _prompts(args)
        _check(args)
        try:  # the run config's syntax: a name, {name: weight}, or a list
            reward_spec = yaml.safe_load(args.reward)
        except yaml.YAMLError:
            reward_spec = args.reward
        parse_reward_spec(reward_spec)
        eval_spec = held_out_spec(args)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = named_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    call_kwargs: dict[str, Any] = dict(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
    )
    if args.max_sequence_length is not None:
        call_kwargs["max_sequence_length"] = args.max_sequence_length

    pipe = load_pipeline(args.base, dtype, device, args.revision)
    n = args.num_images_per_prompt
    base_images = generate(pipe, prompts, n, args.seed, call_kwargs)
    load_lora(pipe, args.lora)
    tuned_images = generate(pipe, prompts, n, args.seed, call_kwargs)
    del pipe

    reward = build_reward(reward_spec, args.reward_device or device, batch_size=args.reward_batch_size)
    per_image = [p for p in prompts for _ in range(n)]
    base = score(reward, base_images, per_image, args.reward_batch_size)
    tuned = score(reward, tuned_images, per_image, args.reward_batch_size)
    space = "reward embedding" if callable(getattr(reward, "embed", None)) else "pixels"
    held_out = None
    if eval_spec is not None:  # judged apart from the reward: its own models, its own rows
        judge = build_reward(eval_spec, args.reward_device or device, batch_size=args.reward_batch_size)
        held_out = tuple(score(judge, images, per_image, args.reward_batch_size) for images in (base_images, tuned_images))
    report = build_report(args, prompts, base, tuned, space, held_out)

    os.makedirs(args.output_dir, exist_ok=True)
    # Per prompt i: a row of its n base images ("i base") above its n fine-tuned ones ("i fine-tuned").
    rows, captions, labels = [], [], []
    for i in range(len(prompts)):
        part = slice(i * n, (i + 1) * n)
        rows += [base_images[part], tuned_images[part]]
        captions += [f"{r:.3g}" for r in torch.cat([base.total[part], tuned.total[part]]).tolist()]
        labels += [f"{i} base", f"{i} fine-tuned"]
    grid = image_grid(torch.cat(rows), ncols=n, captions=captions, row_labels=labels)
    save_image(grid, os.path.join(args.output_dir, "comparison.png"))
    metrics_rows = find_metrics(args.lora)
    if metrics_rows:
        try:
            if plot_curves(metrics_rows, os.path.join(args.output_dir, "curves.png")):
                report["files"]["curves"] = "curves.png"
        except ImportError:  # matplotlib is optional; everything else of the report stands
            print("note: training curves skipped: `pip install matplotlib` to plot them", file=sys.stderr)
    markdown = report_markdown(report)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(markdown)
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
