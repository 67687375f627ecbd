"""The "Staying close on the pixel base" section of ``bench.digits_pixel_sweep`` (``--w2_target``,
``--eval_reward``): the W2 budget's runs against their targets, and the held-out judge's alarm per run."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Optional

from bench import markdown_table


def _entropy_ln5(report: dict) -> float:
    return max(0.0, report["even_entropy"]) / math.log(5)


def _judge(result: dict) -> str:
    held_out = result.get("eval_final") or {}
    return ", ".join(f"{v:.3f}" for v in held_out.values()) or "-"


def latent_drift(work: str, name: str) -> str:
    """``latent_rms`` in round 0 (the base's samples) -> the last round, from the run's ``metrics.jsonl``."""
    path = os.path.join(work, name, "metrics.jsonl")
    if not os.path.isfile(path):
        return "-"
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return f"{rows[0]['latent_rms']:.2f} → {rows[-1]['latent_rms']:.2f}" if rows and "latent_rms" in rows[0] else "-"


def guard_table(results: list[dict], rounds: int, work: str) -> list[list[str]]:
    """One row per run: the judge's numbers, W2 against the target, the final alpha, the alarm's round and
    the drift of the sampled latents' RMS."""
    rows = [["run", "w2_target", "W2", "W2 / target", "final alpha", "P(even)", "entropy (ln5)", "rel. conf.",
             "CNN reward", "judge (last rounds)", "alarm (first round)", "latent RMS (round 0 → last)"]]  # fmt: skip
    for r in results:
        target = r["spec"].get("w2_target")
        rep = r["report"]
        alarm = r.get("alarm_round")
        rows.append([
            r["spec"]["name"], "-" if target is None else f"{target:g}", f"{r['w2_final']:.4f}",
            "-" if target is None else f"{r['w2_final'] / target:.2f}", f"{r['alpha_final']:.4g}",
            f"{rep['p_even']:.3f}", f"{_entropy_ln5(rep):.2f}", f"{rep['relative_confident_share']:.2f}",
            f"{r['reward']:.3f}", _judge(r), "-" if alarm is None else f"{alarm} of {rounds}",
            latent_drift(work, r["spec"]["name"]),
        ])  # fmt: skip
    return rows


def check_guard_targets(results: list[dict], factor: float, rounds: int) -> tuple[list[str], dict[str, Any]]:
    """The issue's checks: each W2 budget within ``factor`` of its target (targets with distinct final W2s);
    the alarm raised before the final round in the alpha-0 runs and never in the alpha-0.1 runs."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    budget = [r for r in results if r["spec"].get("w2_target") is not None]
    if budget:
        ratios = {r["spec"]["name"]: r["w2_final"] / r["spec"]["w2_target"] for r in budget}
        ok = all(1 / factor <= q <= factor for q in ratios.values())
        by_target: dict[float, list[float]] = {}
        for r in budget:
            by_target.setdefault(r["spec"]["w2_target"], []).append(r["w2_final"])
        means = sorted((statistics.fmean(v), t) for t, v in by_target.items())
        distinct = [t for _, t in means] == sorted(by_target) and len(set(m for m, _ in means)) == len(means)
        out.update(w2_within_factor=ok, w2_distinct_and_ordered=distinct, w2_ratios=ratios)
        lines.append(f"{'MET' if ok else 'MISSED'}: every W2 budget ends within a factor {factor:g} of its target "
                     f"(final W2 / target): " + ", ".join(f"{n}: {q:.2f}" for n, q in ratios.items()))  # fmt: skip
        lines.append(f"{'MET' if distinct else 'MISSED'}: the targets give distinct final W2s in their order: "
                     + ", ".join(f"{t:g}: {m:.4f}" for m, t in means))  # fmt: skip
    judged = [r for r in results if r.get("eval_final")]

    def alarms(alpha: float) -> list[tuple[str, Optional[int]]]:
        return [(r["spec"]["name"], r.get("alarm_round")) for r in judged
                if r["spec"].get("w2_target") is None and not r["spec"].get("uniform") and r["spec"]["alpha"] == alpha]  # fmt: skip

    hacked, kept = alarms(0.0), alarms(0.1)
    if hacked:
        ok = all(a is not None and a < rounds - 1 for _, a in hacked)
        out["alarm_alpha0"] = dict(hacked)
        lines.append(f"{'MET' if ok else 'MISSED'}: the alarm is raised before the final round at alpha 0: "
                     + ", ".join(f"{n}: {'never' if a is None else f'round {a}'}" for n, a in hacked))  # fmt: skip
    if kept:
        ok = all(a is None for _, a in kept)
        out["alarm_alpha0.1"] = dict(kept)
        lines.append(f"{'MET' if ok else 'MISSED'}: no alarm at alpha 0.1: "
                     + ", ".join(f"{n}: {'never' if a is None else f'round {a}'}" for n, a in kept))  # fmt: skip
    return lines, out


def guard_section_markdown(begin: str, end: str, rows: list[list[str]], targets: list[str], command: str,
                           settings: str, guard_settings: str, discussion: str, discussion_mark: str) -> str:  # fmt: skip
    lines = [
        begin, "",
        "## Staying close on the pixel base: a W2 budget and a held-out judge", "",
        "The pixel base's only-even-digits runs (\"The paper's experiment on the pixel base\" above), with `w2_target` (alpha set each round by the "
        "W2 budget's controller, starting from the run's alpha) and a held-out judge (`eval_reward`, logged per round "
        "and never trained on) with the reward-hacking alarm. W2 = mean `w2_loss` over the last 20 rounds; judge = "
        "the held-out reward's mean over the same rounds; the other columns as above (1000 evaluation samples).", "",
        f"Reproduce: `{command}`", "", f"Settings: {settings}", "", f"Guards: {guard_settings}", "",
    ]  # fmt: skip
    lines += markdown_table(rows)
    lines += ["", "Checks (by the script):", ""] + [f"- {t}" for t in targets]
    lines += ["", discussion_mark, "", discussion.strip(), "", end]
    return "\n".join(lines) + "\n"
