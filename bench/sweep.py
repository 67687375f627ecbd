"""Shared plumbing of the digits studies (``digits_alpha_sweep``, ``digits_pixel_sweep``, ``digits_pixel_cfg``,
``objective_comparison``): runs as child processes, each run's result files, the sample grids and the
sections of docs/results.md.

A run is a job file (a dict with ``spec.name``, ``spec.group``, ``out_dir`` and what the run needs): the parent
writes it, ``python -m bench.<study> --one <out_dir>/job.json`` runs it and leaves ``<out_dir>/sweep_result.json``
and ``<out_dir>/eval_grid.pt`` (``finish_run``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

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


#: the distance to the base each objective logs, the same mean ||v_theta - v_ref||^2 on the trained field: ORW's
#: w2_loss and DiffusionNFT's kl at forward-path states, Flow-GRPO's velocity_gap at its SDE trajectory's states
DISTANCE_KEYS = ("w2_loss", "velocity_gap", "kl")


def field_distance(rows: list[dict]) -> float:
    """The mean over ``rows`` (metrics.jsonl rows) of the first of ``DISTANCE_KEYS`` each holds."""
    return statistics.fmean(next(r[k] for k in DISTANCE_KEYS if k in r) for r in rows)


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


def mean_spread(values: list[float], digits: int) -> str:
    """``mean ± half the range`` over seeds (just the mean for one seed)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


NO_DISCUSSION = "<!-- written by hand; kept when the script rewrites this section -->"


def update_results(path: str, section_of: Callable[[str], str], begin: str, end: str, discussion_mark: str) -> None:
    """Replace the section between ``begin`` and ``end`` in ``path`` (append it if absent); keep its
    hand-written discussion, the text after ``discussion_mark``. ``section_of(discussion) -> markdown``."""
    old = ""
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    discussion = NO_DISCUSSION
    if begin in old and end in old:
        before, rest = old.split(begin, 1)
        current, after = rest.split(end, 1)
        if discussion_mark in current:
            discussion = current.split(discussion_mark, 1)[1]
        text = before + section_of(discussion).rstrip("\n") + after
    else:
        text = old.rstrip("\n") + ("\n\n" if old else "") + section_of(discussion)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def mini_digits_base(work: str) -> str:
    """The --quick runs' digits base: a mini build in ``<work>/cache`` (seconds), built once."""
    from orw_diffusers import digits

    base = os.path.join(work, "cache", digits.BASE_NAME)
    if not os.path.isdir(base):
        digits.build_digits_base(base, mini=True, progress=False)
    return base
