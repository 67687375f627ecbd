"""Every benchmark and digits study runs (``--quick``: a tiny model, one repetition). No timing is asserted:
the figures live in docs/benchmarks.md, written by ``python -m bench.run_all``."""

import importlib
import json
import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, REPO)  # bench/ and experiments/ are folders of scripts at the repository root (python -m bench.x)

IN_PROCESS = [
    ("w2_overhead",),
    ("round_efficiency",),
    ("sampler_vs_diffusers",),
    ("planner_validation",),
    ("experiments.digits_pixel_sweep",),
]


@pytest.fixture(autouse=True, scope="module")
def fresh_model_cache(tmp_path_factory):
    """Build the benchmark pipelines from the current code, not from an earlier run's /tmp cache."""
    common = importlib.import_module("bench.common")
    old, common.MODEL_CACHE = common.MODEL_CACHE, str(tmp_path_factory.mktemp("bench-models"))
    yield
    common.MODEL_CACHE = old


def _run(name: str, tmp_path, *extra: str) -> dict:
    name = name if "." in name else f"bench.{name}"  # the digits studies are in experiments/
    module = importlib.import_module(name)
    out = tmp_path / f"{name.rsplit('.', 1)[-1]}.json"
    assert module.main(["--quick", "--json", str(out), *extra]) == 0
    section = json.loads(out.read_text())
    assert section["command"] == f"python -m {name}"
    header, *rows = section["table"]
    assert rows and all(len(row) == len(header) for row in rows)
    return section


@pytest.mark.parametrize("name_and_options", IN_PROCESS, ids=" ".join)
def test_benchmark_runs(name_and_options, tmp_path):
    section = _run(*name_and_options[:1], tmp_path, *name_and_options[1:])
    assert section["results"]


def test_pixel_sweep_cfg_measures_the_sampled_field(tmp_path):
    """--cfg: three arms per alpha on the class-conditional base, each with the sampled-field gap, in its section."""
    section = _run("experiments.digits_pixel_sweep", tmp_path, "--cfg", "--work_dir", str(tmp_path / "work"))
    assert [row[0] for row in section["table"][1:]] == ["base, guidance 1", "base, guidance 2", "guidance 1, alpha = 0",
                                                       "guidance 2, guided loss, alpha = 0",
                                                       "guidance 2, conditional loss, alpha = 0"]  # fmt: skip
    assert "sampled-field gap" in section["table"][0]
    text = (tmp_path / "work" / "results.md").read_text()
    reproduce = next(line for line in text.splitlines() if line.startswith("Reproduce: "))
    assert "## The class-conditional pixel base" in text and "experiments.digits_pixel_sweep" in reproduce and "--cfg" in reproduce


def test_two_processes_report_without_launching(monkeypatch):
    """The launches take minutes (start-up of three interpreters); the arithmetic is checked here."""
    two = importlib.import_module("bench.two_processes")
    launched = []

    def fake_launch(processes, run_yaml, output_dir):
        launched.append(processes)
        return {"samples_per_s": 1.0 * processes, "samples_per_cpu_s": 1.0 * processes, "wall": 10.0, "load": 1.0}

    monkeypatch.setattr(two, "_launch", fake_launch)
    section = two.run(quick=True, reps=2)
    assert sorted(launched) == [1, 1, 2, 2]
    assert section.results["speedup"] == pytest.approx(2.0) and section.results["met"]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ORW_SLOW_TESTS"), reason="launches 1 + 2 training processes (1-2 min); set ORW_SLOW_TESTS=1"
)
def test_two_processes_launches(tmp_path):
    assert _run("two_processes", tmp_path)["results"]["speedup"] > 0


def test_run_all_renders_the_summary():
    run_all = importlib.import_module("bench.run_all")
    section = {
        "title": "Round efficiency",
        "command": "python -m bench.round_efficiency",
        "table": [["a", "b"], ["1", "2"]],
        "notes": ["n"],
        "results": {"overhead": 0.04, "overhead_of_medians": 0.05, "met": True},
    }
    text = run_all.render({"round_efficiency": section}, "a machine", quick=False)
    assert "| the time of a round goes to the models, not to our code |" in text
    assert "4.0% per repetition; 5.0% from the medians" in text and "Reproduce: `python -m bench.round_efficiency`" in text


def test_pixel_sweep_with_a_w2_budget_and_a_judge(tmp_path):
    """--w2_target and --eval_reward reach the runs (their metrics) and the report's own section."""
    section = _run("experiments.digits_pixel_sweep", tmp_path, "--w2_target", "0.5", "--eval_reward", "digit_judge_even",
                   "--no_control", "--work_dir", str(tmp_path / "work"))  # fmt: skip
    header = section["table"][0]
    assert "w2_target" in header and "alarm (first round)" in header
    assert [row[0] for row in section["table"][1:]] == ["alpha0-s0", "target0.5-s0"]
    rows = [json.loads(line) for line in (tmp_path / "work" / "target0.5-s0" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/digit_judge_even_mean" in r and "hacking_alarm" in r for r in rows)
    assert rows[1]["w2_coefficient"] != rows[0]["w2_coefficient"] == 0.1  # the budget moved alpha
    text = (tmp_path / "work" / "results.md").read_text()
    assert "## Staying close on the pixel base" in text and "## The paper's experiment on the pixel base" not in text


def test_frontier_runs_the_three_objectives_on_the_pixel_base_and_resumes(tmp_path, capsys):
    """The frontier's plumbing on one base and target (the SD3 base's runner is the alpha sweep's, tested with it):
    each objective trains through ORWCFMTrainer, its result holds what the table needs, and a rerun reuses it."""
    frontier = importlib.import_module("experiments.frontier")
    work = tmp_path / "work"
    argv = ["--quick", "--bases", "pixel", "--targets", "three", "--work_dir", str(work)]
    assert frontier.main(argv) == 0
    runs = sorted(d for d in work.iterdir() if (d / "sweep_result.json").exists())
    results = [json.loads((d / "sweep_result.json").read_text()) for d in runs]
    assert sorted(r["frontier"]["objective"] for r in results) == sorted(frontier.KNOBS)
    distance = {"orw_cfm_w2": "w2_loss", "flow_grpo": "velocity_gap", "diffusion_nft": "kl"}
    for run, result in zip(runs, results):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(distance[result["frontier"]["objective"]] in r for r in rows)  # that objective's loss ran
        assert result["spec"]["classes"] == [1, 4, 7] and len(result["reward_curve"]) == 2
        assert result["per_round"] == 8 and result["passes_per_round"] >= 6  # at least the 6 sampling steps
    assert (work / "frontier_pixel_three.png").is_file()
    stamps = [(d / "sweep_result.json").stat().st_mtime_ns for d in runs]
    assert frontier.main(argv) == 0
    assert [(d / "sweep_result.json").stat().st_mtime_ns for d in runs] == stamps  # nothing trained again
    capsys.readouterr()
    assert frontier.main([*argv, "--report_only", "--knob_index", "0", "1"]) == 1  # knob value 0 never ran
    assert [(d / "sweep_result.json").stat().st_mtime_ns for d in runs] == stamps
    out = capsys.readouterr().out  # the report shows what ran: knob value 0 is named as left out, not as a row
    assert "3 planned points have no finished run" in out and "not finished" not in out
    assert sum(line.startswith("| pixel | three |") for line in out.splitlines()) == 3


def test_frontier_slice_on_the_sd3_base_with_a_setting(tmp_path):
    """The objective comparison's slices: the SD3 base, odd digits, one objective with a training setting changed."""
    frontier = importlib.import_module("experiments.frontier")
    work = tmp_path / "work"
    argv = ["--quick", "--bases", "sd3", "--targets", "odd", "--objectives", "flow_grpo", "--set", "kl_type=exact"]
    assert frontier.main([*argv, "--work_dir", str(work)]) == 0
    run = work / "sd3-odd-flow_grpo-kl_beta0.04-s0"
    assert "kl_type: exact" in (run / "config.yaml").read_text()
    assert json.loads((run / "sweep_result.json").read_text())["frontier"]["target"] == "odd"
    for bad in ("kl_beta=1", "kl_typ=exact"):  # a knob the bench sets, an unknown key: argparse errors, before any run
        with pytest.raises(SystemExit) as exit_info:
            frontier.main([*argv[:-1], bad])
        assert exit_info.value.code == 2


def test_the_frontier_report_has_a_column_per_seed_where_a_point_has_several():
    """A target that must hold on every seed is read off per seed: each multi-seed point gets "P / H / rel. conf."
    per seed, a missing seed an empty cell; single-seed points are left out."""
    frontier = importlib.import_module("experiments.frontier")

    def run(seed: int, histogram: list[float], conf: float) -> dict:
        return {"spec": {"seed": seed}, "frontier": {"target": "three"},
                "report": {"histogram": histogram, "relative_confident_share": conf}}  # fmt: skip

    uniform = [0, 1 / 3, 0, 0, 1 / 3, 0, 0, 1 / 3, 0, 0]
    groups = {("pixel", "three", "flow_grpo", 0.04): [run(0, uniform, 0.9), run(2, [0, 1, 0, 0, 0, 0, 0, 0, 0, 0], 0.5)],
              ("pixel", "three", "orw_cfm_w2", 0.1): [run(1, uniform, 0.8)],
              ("pixel", "three", "diffusion_nft", 0.01): [run(1, uniform, 0.7), run(2, uniform, 0.6)]}  # fmt: skip
    rows = frontier.per_seed_table(groups)
    assert rows == [["base", "target", "objective", "knob", "seed 0", "seed 1", "seed 2"],
                    ["pixel", "three", "flow_grpo", "kl_beta 0.04", "1.000 / 1.00 / 0.90", "", "1.000 / 0.00 / 0.50"],
                    ["pixel", "three", "diffusion_nft", "kl_beta 0.01", "", "1.000 / 1.00 / 0.70", "1.000 / 1.00 / 0.60"]]  # fmt: skip
    assert frontier.per_seed_table({k: v[:1] for k, v in groups.items()}) == []
