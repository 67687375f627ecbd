"""Shared plumbing of the digits studies (``digits_alpha_sweep``, ``digits_pixel_sweep``, ``frontier``): runs as
child processes, each run's result files, the SVC's figures and the sections of docs/results.md.

A run is a job file (a dict with ``spec.name``, ``spec.group``, ``out_dir`` and what the run needs): the parent
writes it, ``python -m experiments.<study> --one <out_dir>/job.json`` runs it and leaves ``<out_dir>/sweep_result.json``
and ``<out_dir>/eval_grid.pt`` (``finish_run``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from bench import REPO


def run_job_file(path: str, run: Callable[[dict[str, Any]], Any]) -> int:
    """The child's side (``--one PATH``): ``run`` the job in ``path``."""
    with open(path) as f:
        run(json.load(f))
    return 0


def finish_run(out_dir: str, result: dict[str, Any], grid_images: Any) -> dict[str, Any]:
    """Save a run's result (``sweep_result.json``) and the samples of its grid (``eval_grid.pt``); returns ``result``."""
    import torch

    torch.save(grid_images, os.path.join(out_dir, "eval_grid.pt"))
    with open(os.path.join(out_dir, "sweep_result.json"), "w") as f:
        json.dump(result, f)
    return result


def finished_result(job: dict) -> Optional[dict]:
    """The run's ``sweep_result.json`` if an earlier run of the same job file finished it, else None."""
    job_path, path = os.path.join(job["out_dir"], "job.json"), os.path.join(job["out_dir"], "sweep_result.json")
    if not (os.path.isfile(job_path) and os.path.isfile(path)):
        return None
    with open(job_path) as f:
        if json.load(f) != json.loads(json.dumps(job)):  # another job in the same folder: run it again
            return None
    with open(path) as f:
        return json.load(f)


def run_child_jobs(jobs: list[dict], module: str, max_jobs: int, env: dict[str, str],
                   summary: Callable[[dict], str], resume: bool = False) -> list[dict]:  # fmt: skip
    """Run ``python -m module --one <out_dir>/job.json`` for each job (``max_jobs`` at a time, output in
    ``<out_dir>/run.log``) and return each child's ``<out_dir>/sweep_result.json`` as it finishes. A failed
    child is reported and left out. ``resume``: a job whose folder holds its finished result is not run again."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    done = [finished_result(job) if resume else None for job in jobs]
    pending, active = [job for job, result in zip(jobs, done) if result is None], []
    results = [result for result in done if result is not None]
    for result in results:
        print(f"{result['spec']['name']}: finished before, {summary(result)}", flush=True)
    while pending or active:
        while pending and len(active) < max_jobs:
            job = pending.pop(0)
            os.makedirs(job["out_dir"], exist_ok=True)
            job_path = os.path.join(job["out_dir"], "job.json")
            with open(job_path, "w") as f:
                json.dump(job, f)
            log = open(os.path.join(job["out_dir"], "run.log"), "w")
            proc = subprocess.Popen([sys.executable, "-m", module, "--one", job_path], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO, env=env)  # fmt: skip
            active.append((job, proc, log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(active):
            job, proc, log, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            name, path = job["spec"]["name"], os.path.join(job["out_dir"], "sweep_result.json")
            if proc.returncode != 0 or not os.path.exists(path):
                print(f"{name}: FAILED (rc {proc.returncode}); see {os.path.join(job['out_dir'], 'run.log')}", flush=True)
                continue
            with open(path) as f:
                results.append(json.load(f))
            print(f"{name}: {time.perf_counter() - t0:.0f} s, {summary(results[-1])}", flush=True)
    return results


def study_parser(module: str, doc: str, quick: str, seeds: list[int], num_eval: int, set_help: str = "",
                 ) -> argparse.ArgumentParser:  # fmt: skip
    """The options every digits study takes: --quick (``quick``: what it runs), --seeds, the evaluation, the processes,
    the run folders, and --set (``set_help``: an example; "": none)."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{module}", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"plumbing only: {quick}")
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--num_eval", type=int, default=num_eval, help="evaluation samples per run")
    parser.add_argument("--eval_seed", type=int, default=1234)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work_dir", default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one job file
    if set_help:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"a training override for every run, e.g. --set {set_help} (repeatable)")
    return parser


def parse_overrides(parser: argparse.ArgumentParser, items: list[str], per_run: Sequence[str] = (),
                    objectives: Sequence[str] = ("orw_cfm_w2",)) -> dict[str, Any]:  # fmt: skip
    """``--set KEY=VALUE`` items -> {key: YAML value}, checked as the training script would check them (unknown
    keys, wrong types, keys of another objective than each of ``objectives``; ``per_run``: keys the study sets for each
    run) with an argparse error (exit 2)."""
    import yaml

    from orw_diffusers.config import from_dict
    from orw_diffusers.errors import ConfigError

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY a training config key")
        if key in per_run:
            parser.error(f"--set {item!r}: the study sets {key} for each run ({', '.join(dict.fromkeys(per_run))})")
        overrides[key] = yaml.safe_load(value)
    try:
        for objective in objectives:
            from_dict({**overrides, "objective": objective})
    except ConfigError as e:
        parser.error(f"--set: {e}")
    return overrides


#: the distance to the base each objective logs, the same mean ||v_theta - v_ref||^2 on the trained field: ORW's
#: w2_loss and DiffusionNFT's kl at forward-path states, Flow-GRPO's velocity_gap at its SDE trajectory's states
DISTANCE_KEYS = ("w2_loss", "velocity_gap", "kl")
LAST_ROUNDS = 20  # the distance is averaged over this many final rounds


def field_distance(rows: list[dict]) -> float:
    """The mean over the last ``LAST_ROUNDS`` of ``rows`` (metrics.jsonl rows) of the first of ``DISTANCE_KEYS``
    each holds."""
    return statistics.fmean(next(r[k] for k in DISTANCE_KEYS if k in r) for r in rows[-LAST_ROUNDS:])


def target_stats(report: dict, classes: Sequence[int]) -> tuple[float, float]:
    """(P(classes), the entropy within ``classes`` in units of ln(number of classes)) of an SVC report."""
    import torch

    from orw_diffusers.digits import subset_entropy

    entropy = subset_entropy(torch.tensor(report["histogram"]), tuple(classes)) / math.log(len(classes))
    return sum(report["histogram"][d] for d in classes), max(0.0, entropy)  # max: no -0.00


def histogram_text(histogram: Sequence[float]) -> str:
    return " ".join(str(round(100 * h)) for h in histogram)


def mean_spread(values: list[float], digits: int) -> str:
    """``mean ± half the range`` over seeds (just the mean for one seed)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def by_group(results: list[dict]) -> dict[str, list[dict]]:
    """The runs of each table row (``spec.group``), in the order of ``results``."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(result["spec"]["group"], []).append(result)
    return groups


def write_group_grids(results: list[dict], work: str, img_dir: str, prefix: str, write: Callable[[Any, str], Any],
                      files: dict[str, str]) -> dict[str, str]:  # fmt: skip
    """``files`` (group -> file name, e.g. the base's grid) plus one grid per group of ``results``: its first run's
    ``eval_grid.pt``, written by ``write(images, path)`` as ``<prefix><run name less -sSEED, '.' as 'p'>.png``."""
    import torch

    os.makedirs(img_dir, exist_ok=True)
    files = dict(files)
    for result in results:
        group, name = result["spec"]["group"], result["spec"]["name"]
        if group not in files:
            files[group] = prefix + name.rsplit("-s", 1)[0].replace(".", "p") + ".png"
            write(torch.load(os.path.join(work, name, "eval_grid.pt")), os.path.join(img_dir, files[group]))
    return files


def check(ok: bool, text: str) -> str:
    """One line of a study's checks."""
    return f"{'MET' if ok else 'MISSED'}: {text}"


def alpha_means(results: list[dict], stats: Callable[[dict], tuple[float, float]]) -> dict[float, list[float]]:
    """Each alpha's mean (P(target), entropy, relative confident share, W2) over ``results``, in the order of alpha;
    ``stats(result)``: its (P(target), entropy)."""
    by_alpha: dict[float, list[dict]] = {}
    for r in results:
        by_alpha.setdefault(r["spec"]["alpha"], []).append(r)
    return {a: [statistics.fmean(v) for v in zip(*[(*stats(r), r["report"]["relative_confident_share"], r["w2_final"])
                                                   for r in rs])] for a, rs in sorted(by_alpha.items())}  # fmt: skip


def alpha_checks(m: dict[float, list[float]], collapse_p: float = 0.97, collapse_entropy: float = 0.5) -> list[str]:
    """The checks every alpha sweep makes of its ``alpha_means``: alpha 0 collapses, W2 falls and the entropy within
    the target rises as alpha grows."""
    alphas, pairs, lines = list(m), list(zip(m, list(m)[1:])), []
    if 0.0 in m:
        lines.append(check(m[0.0][0] >= collapse_p and m[0.0][1] <= collapse_entropy, f"alpha = 0 collapses (P(even) >= "
                           f"{collapse_p} and entropy <= {collapse_entropy} ln5): P(even) {m[0.0][0]:.3f}, entropy "
                           f"{m[0.0][1]:.2f} ln5"))  # fmt: skip
    if pairs:
        lines.append(check(all(m[a][3] > m[b][3] for a, b in pairs), "W2 falls as alpha grows: "
                           + ", ".join(f"{a:g}: {m[a][3]:.4f}" for a in alphas)))  # fmt: skip
        lines.append(check(all(m[a][1] <= m[b][1] for a, b in pairs), "the even-class entropy rises with alpha: "
                           + ", ".join(f"{a:g}: {m[a][1]:.2f}" for a in alphas)))  # fmt: skip
    return lines


NO_DISCUSSION = "<!-- written by hand; kept when the script rewrites this section -->"
REPRODUCE = "Reproduce: `"  # a section's figures start at this line


def write_section(path: str, begin: str, end: str, title: str, body: list[str], discussion_mark: Optional[str] = None,
                  ) -> None:  # fmt: skip
    """Write a study's section of ``path`` between the markers ``begin`` and ``end`` (appended if absent): ``body``
    (from its ``Reproduce:`` line on) after the hand-written heading and introduction of the old section (a new
    section: ``title``, its heading); with ``discussion_mark``, that heading and the hand-written discussion under it follow."""
    old, current = "", ""
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    before, after = old.rstrip("\n") + ("\n\n" if old else ""), "\n"
    if begin in old and end in old:
        before, rest = old.split(begin, 1)
        current, after = rest.split(end, 1)
    intro = current.split(REPRODUCE, 1)[0].strip() if REPRODUCE in current else title
    lines = [begin, "", intro, "", *body, ""]
    if discussion_mark:
        discussion = current.split(discussion_mark, 1)[1] if discussion_mark in current else NO_DISCUSSION
        lines += [discussion_mark, "", discussion.strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(before + "\n".join(lines + [end]) + after)


def mini_digits_base(work: str) -> str:
    """The --quick runs' digits base: a mini build in ``<work>/cache`` (seconds), built once."""
    from orw_diffusers import digits

    base = os.path.join(work, "cache", digits.BASE_NAME)
    if not os.path.isdir(base):
        digits.build_digits_base(base, mini=True, progress=False)
    return base
