"""fedtune-sweep end to end: real fedtune-sim runs (central, tiny model), outputs, and resuming."""

from __future__ import annotations

import csv
import json

import pytest

from fedtune.common import exit_codes
from fedtune.sim.sweep import main
from fedtune.sim.sweep_report import CSV_FILE, PLOT_FILE, TABLE_FILE


@pytest.mark.slow
def test_a_two_point_sweep_writes_its_outputs_and_a_rerun_runs_only_unfinished_points(
        tiny_model_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--epsilon", "8,inf", "--repeats", "1", "--modes", "central", "--out", str(out),
            "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv), "--set", "partition-by=group",
            "--set", "max-seq-len=16", "--set", "batch-size=32", "--rounds", "1"]
    assert main(argv) == exit_codes.OK
    assert "2 points, 2 run now" in " ".join(capsys.readouterr().err.split())
    rows = list(csv.DictReader((out / CSV_FILE).open()))
    assert [(r["mode"], r["epsilon"], r["status"]) for r in rows] == [("central", "8", "completed"),
                                                                      ("central", "inf", "completed")]
    assert 0 < float(rows[0]["epsilon-spent"]) <= 8 and rows[1]["epsilon-spent"] == "inf"
    assert float(rows[0]["majority-accuracy"]) > 0
    table = (out / TABLE_FILE).read_text()
    assert "| central DP | 8 |" in table and "| central non-private (--no-dp) | ∞ |" in table
    assert "Gap to central non-private: central DP at ε = 8 reaches" in table
    assert (out / PLOT_FILE).stat().st_size > 0
    dp_summary = out / "points" / "central-eps8-seed42" / "summary.json"
    assert json.loads(dp_summary.read_text())["settings"]["epsilon"] == 8.0

    assert main(argv) == exit_codes.OK  # resumed: both points are finished
    assert "2 points, 0 run now" in " ".join(capsys.readouterr().err.split())
    reference = out / "points" / "central-epsinf-seed42" / "summary.json"
    before = reference.stat().st_mtime_ns
    dp_summary.unlink()  # as if the sweep had been stopped during this point
    assert main(argv) == exit_codes.OK
    assert "2 points, 1 run now" in " ".join(capsys.readouterr().err.split())
    assert dp_summary.is_file() and reference.stat().st_mtime_ns == before
