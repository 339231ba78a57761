"""fedtune-sweep without training: the grid, the options it refuses, resuming, and the outputs read back."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedtune.common import exit_codes
from fedtune.common.errors import ConfigError
from fedtune.sim.sweep import Point, build, grid, main, parse_epsilons
from fedtune.sim.sweep_report import CSV_FILE, PLOT_FILE, TABLE_FILE, markdown


def test_epsilons_are_parsed_sorted_and_inf_is_the_non_private_point():
    assert parse_epsilons("8, 1,inf,2,8") == [1.0, 2.0, 8.0, math.inf]
    with pytest.raises(ConfigError) as err:
        parse_epsilons("1,zero,-2")
    assert "got '1,zero,-2'" in str(err.value)


def test_the_grid_always_holds_the_central_non_private_reference_once():
    points = grid([1.0, math.inf], 2, 42, ["federated"])
    assert [p.name for p in points] == ["federated-eps1-seed42", "federated-eps1-seed43", "federated-epsinf-seed42",
                                        "federated-epsinf-seed43", "central-epsinf-seed42", "central-epsinf-seed43"]
    central = grid([8.0, math.inf], 1, 7, ["federated", "central"])
    assert sum(p == Point("central", math.inf, 7) for p in central) == 1
    assert Point("central", 8.0, 7).sim_args("off") == ["--dp-mode", "dp", "--epsilon", "8", "--seed", "7",
                                                         "--central"]
    assert Point("federated", math.inf, 7).sim_args("clip-only") == ["--dp-mode", "clip-only", "--seed", "7"]


def test_a_study_row_may_leave_the_reference_out():
    """--no-reference: one lever of a study, whose central non-private reference another sweep ran."""
    assert [p.name for p in grid([8.0], 2, 42, ["federated"], reference=False)] == [
        "federated-eps8-seed42", "federated-eps8-seed43"]
    sweep, _ = build(["--epsilon", "8", "--repeats", "1", "--no-reference", "--out", "x", "--rounds", "2"])
    assert [p.name for p in sweep.points] == ["federated-eps8-seed42"] and sweep.sim_options == ["--rounds", "2"]


def test_options_the_sweep_sets_per_point_are_refused_all_at_once():
    with pytest.raises(ConfigError) as err:
        build(["--epsilon", "1", "--repeats", "0", "--dp-mode=off", "--no-dp", "--out", "x", "--jobs", "0",
               "--retries", "-1"])
    problems = err.value.problems
    assert any("--dp-mode is set by fedtune-sweep" in p for p in problems)
    assert any("--no-dp is set by fedtune-sweep" in p for p in problems)
    assert "--repeats must be >= 1, got 0" in problems and "--jobs must be >= 1, got 0" in problems
    assert "--retries must be >= 0, got -1" in problems


def _finish(out: Path, name: str, accuracy: float, epsilon: float, status: str = "completed") -> None:
    """A point's results directory as a finished fedtune-sim run leaves it (its summary.json)."""
    point = out / "points" / name
    point.mkdir(parents=True)
    summary = {"status": status, "final-accuracy": accuracy, "final-loss": 0.5, "epsilon-max": epsilon,
               "majority-accuracy": 0.6, "rounds": 2, "elapsed-s": 1.0}
    if status != "completed":
        summary |= {"stop-code": "diverged"}
    (point / "summary.json").write_text(json.dumps(summary))


def test_a_sweep_whose_points_are_finished_runs_none_and_writes_csv_table_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    for name, acc, eps in [("federated-eps8-seed42", 0.70, 7.9), ("federated-eps8-seed43", 0.74, 7.95),
                           ("federated-epsinf-seed42", 0.80, math.inf), ("federated-epsinf-seed43", 0.78, math.inf),
                           ("central-epsinf-seed42", 0.84, math.inf)]:
        _finish(out, name, acc, eps)
    _finish(out, "central-epsinf-seed43", 0.5, math.inf, status="stopped-early")
    argv = ["--epsilon", "8,inf", "--repeats", "2", "--out", str(out), "--clients", "2"]
    assert main(argv) == exit_codes.OK
    assert not (out / "logs").exists()  # nothing was run: every point was finished
    assert "6 points, 0 run now" in capsys.readouterr().err
    rows = list(csv.DictReader((out / CSV_FILE).open()))
    assert len(rows) == 6 and rows[-1]["stop-code"] == "diverged"
    table = (out / TABLE_FILE).read_text()
    assert "Produced by: `fedtune-sweep --epsilon 8,inf --repeats 2" in table
    assert "| federated DP | 8 | 7.925 | 0.7200 ± 0.0283 | 2 | 2 completed |" in table
    assert "| central non-private (--no-dp) | ∞ | ∞ | 0.6700 ± 0.2404 | 2 | 1 completed, 1 diverged |" in table
    assert "Majority-class accuracy of the held-out set: 0.6000" in table
    assert "federated DP at ε = 8 reaches 0.7200, 5.0 points above central non-private (0.6700)" in table
    assert (out / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_directory_refuses_points_run_with_other_options(tmp_path, capsys):
    out = tmp_path / "sweep"
    for name in ("federated-eps8-seed42", "central-epsinf-seed42"):
        _finish(out, name, 0.7, 8.0)
    assert main(["--epsilon", "8", "--repeats", "1", "--out", str(out), "--clients", "2"]) == exit_codes.OK
    code = main(["--epsilon", "8", "--repeats", "1", "--out", str(out), "--clients", "3"])
    assert code == exit_codes.BAD_INPUT
    err = " ".join(capsys.readouterr().err.split())
    assert "holds a sweep run with other options (--clients 2 --baseline off)" in err


def test_report_only_names_the_grid_command_and_the_unfinished_points(tmp_path):
    out = tmp_path / "sweep"
    _finish(out, "federated-eps8-seed42", 0.7, 7.9)
    argv = ["--epsilon", "8", "--repeats", "1", "--out", str(out), "--clients", "2", "--report-only"]
    assert main(argv) == exit_codes.FAILED
    assert not (out / "logs").exists()
    table = (out / TABLE_FILE).read_text()
    assert f"Produced by: `fedtune-sweep --epsilon 8 --repeats 1 --out {out} --clients 2`" in table
    assert "Not finished (1 of the grid's points, left out above): central-epsinf-seed42." in table


def test_the_table_names_the_clip_only_baseline():
    rows = [{"mode": "federated", "epsilon": "inf", "seed": 1, "status": "completed", "stop-code": "",
             "final-accuracy": 0.8, "epsilon-spent": math.inf, "majority-accuracy": 0.5}]
    assert "| federated non-private (clip-only) | ∞ |" in markdown(rows, "fedtune-sweep", "clip-only")
