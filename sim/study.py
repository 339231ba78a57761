"""A table of several sweeps side by side: ``python -m fedtune.sim.study DIR [DIR ...]``.

Each DIR is a ``fedtune-sweep --out`` directory. Every (mode, epsilon) cell of every sweep becomes one row: the
sweep's name, the fedtune-sim options it ran with (the command in its ``sweep.json``), the held-out accuracy's
mean +- sample standard deviation over its seeds, the run with seed 42 alone (the one seed every row has: the
same split and initial adapter, so single-seed rows compare with it), the largest epsilon spent, and the mean
time of a run (``elapsed-s``; runs that shared the cores with other work took longer).
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

FIRST_SEED = 42  # fedtune-sweep's default first seed: single-seed rows compare with this column


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
        first = [r["final-accuracy"] for r in rows if r["mode"] == cell.mode and r["epsilon"] == eps
                 and r["final-accuracy"] is not None and int(r["seed"]) == FIRST_SEED]
        out.append(f"| {directory.name} | {cell.mode} | `{shown}` | {eps} | {spent} | {cell.accuracy_text()} | "
                   f"{len(cell.accuracies)} | {f'{first[0]:.4f}' if first else '-'} | "
                   f"{_seconds(rows, cell.mode, eps):.0f} |")
    return out


def markdown(directories: Sequence[Path]) -> str:
    head = ("| row | mode | fedtune-sim options | ε | ε spent (max) | held-out accuracy (mean ± std) | runs | "
            f"seed {FIRST_SEED} | s per run |\n|---|---|---|---|---|---|---|---|---|")
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
