"""The accuracy study's table: several fedtune-sweep directories, one row per (mode, epsilon) cell."""

from __future__ import annotations

import csv
import json

from fedtune.sim.study import main, markdown
from fedtune.sim.sweep_report import COLUMNS, CSV_FILE


def _sweep(path, options, runs):
    path.mkdir()
    (path / "sweep.json").write_text(json.dumps({"fedtune-sim-options": options}))
    with open(path / CSV_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for mode, eps, seed, acc, spent, secs in runs:
            writer.writerow({"mode": mode, "epsilon": eps, "seed": seed, "status": "completed", "final-accuracy": acc,
                             "epsilon-spent": spent, "elapsed-s": secs, "warnings": 0})


def test_each_sweep_cell_is_a_row_with_its_seed_42_run(tmp_path, capsys):
    _sweep(tmp_path / "recipe", ["--max-train-examples", "0"],
           [("federated", "8", 42, 0.75, 7.99, 100), ("federated", "8", 43, 0.77, 8.0, 120),
            ("central", "inf", 42, 0.80, "", 60)])
    _sweep(tmp_path / "lever", [], [("federated", "8", 42, 0.76, 7.98, 90)])
    table = markdown([tmp_path / "recipe", tmp_path / "lever"]).splitlines()
    assert table[2] == ("| recipe | federated | `--max-train-examples 0` | 8 | 8.000 | 0.7600 ± 0.0141 | 2 | 0.7500 "
                        "| 110 |")
    assert table[3].startswith("| recipe | central | `--max-train-examples 0` | inf | ∞ | 0.8000 | 1 | 0.8000 |")
    assert table[4] == "| lever | federated | `(defaults)` | 8 | 7.980 | 0.7600 | 1 | 0.7600 | 90 |"
    assert main([str(tmp_path / "missing")]) == 2 and "no sweep.csv" in capsys.readouterr().err
