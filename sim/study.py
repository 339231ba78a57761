"""A table of several sweeps side by side: ``python -m fedtune.sim.study DIR [DIR ...]``.

Each DIR is a ``fedtune-sweep --out`` directory. Every (mode, epsilon) cell of every sweep becomes one row: the
sweep's name, the fedtune-sim options it ran with (the command in its ``sweep.json``), the held-out accuracy's
mean +- sample standard deviation over its seeds, the largest epsilon spent, and the mean wall time of a run.
The accuracy study in docs/results.md is this table; each of its rows is reproduced by its sweep's command.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.sim.sweep_report import CSV_FILE, cells


def _seconds(rows: Sequence[dict[str, Any]], mode: str, epsilon: str) -> float:
    times = [float(r["elapsed-s"]) for r in rows if r["mode"] == mode and r["epsilon"] == epsilon and r["elapsed-s"]]
    return statistics.fmean(times) if times else float("nan")


def sweep_rows(directory: Path) -> list[str]:
    """The markdown rows of one sweep directory (empty when it has no finished point)."""
    table = directory / CSV_FILE
    if not table.is_file():
        return []
    with table.open(newline="") as f:
        rows: list[dict[str, Any]] = list(csv.DictReader(f))
    for row in rows:  # the CSV's numbers back to numbers (empty: none)
        for key in ("final-accuracy", "epsilon-spent"):
            row[key] = float(row[key]) if row[key] else None
    options = json.loads((directory / "sweep.json").read_text()).get("fedtune-sim-options", [])
    shown = " ".join(options) or "(defaults)"
    out = []
    for cell in cells(rows):
        eps = "inf" if cell.epsilon == float("inf") else f"{cell.epsilon:g}"
        finite = [x for x in cell.spent if x == x and x != float("inf")]
        spent = f"{max(finite):.3f}" if finite else "∞"
        out.append(f"| {directory.name} | {cell.mode} | `{shown}` | {eps} | {spent} | {cell.accuracy_text()} | "
                   f"{len(cell.accuracies)} | {_seconds(rows, cell.mode, eps):.0f} |")
    return out


def markdown(directories: Sequence[Path]) -> str:
    head = ("| row | mode | fedtune-sim options | ε | ε spent (max) | held-out accuracy (mean ± std) | runs | "
            "s per run |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *[line for d in directories for line in sweep_rows(d)]]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.sim.study", description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="fedtune-sweep --out directories, in table order")
    args = p.parse_args(argv)
    missing = [str(d) for d in args.sweeps if not (d / CSV_FILE).is_file()]
    if missing:
        print(f"no {CSV_FILE} in: {', '.join(missing)} (run the sweep, or fedtune-sweep --report-only)",
              file=sys.stderr)
        return 2
    sys.stdout.write(markdown(args.sweeps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
