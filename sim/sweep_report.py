"""A sweep's outputs, read back from its points' ``summary.json``: ``sweep.csv``, ``sweep.md``, ``sweep.png``.

The CSV has one row per run. The markdown table groups runs by (mode, epsilon) with the held-out accuracy's
mean +- sample standard deviation over seeds, the epsilon actually spent (the largest cumulative epsilon any
node reported), and how the runs ended; it names the command that produced it, the held-out set's
majority-class accuracy, and the gap between the best private setting at epsilon 8 (or the largest epsilon
run) and the central non-private baseline. The plot draws accuracy against epsilon (log scale) with error
bars, the non-private runs at the right edge, and the central non-private mean as a line.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.durable import write_atomically

if TYPE_CHECKING:
    from fedtune.sim.sweep import Sweep

CSV_FILE, TABLE_FILE, PLOT_FILE = "sweep.csv", "sweep.md", "sweep.png"
COLUMNS = ("mode", "epsilon", "seed", "status", "stop-code", "final-accuracy", "final-loss", "epsilon-spent",
           "majority-accuracy", "rounds", "elapsed-s", "warnings", "results")
REFERENCE_EPSILON = 8.0


def point_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per finished point, in grid order."""
    from fedtune.sim.sweep import eps_label, finished

    rows = []
    for point in sweep.points:
        summary = finished(sweep.point_dir(point))
        if summary is None:
            continue
        rows.append({
            "mode": point.mode, "epsilon": eps_label(point.epsilon), "seed": point.seed,
            "status": summary.get("status"), "stop-code": summary.get("stop-code") or "",
            "final-accuracy": summary.get("final-accuracy"), "final-loss": summary.get("final-loss"),
            "epsilon-spent": summary.get("epsilon-max"), "majority-accuracy": summary.get("majority-accuracy"),
            "rounds": summary.get("rounds"), "elapsed-s": summary.get("elapsed-s"),
            "warnings": len(summary.get("warnings") or []),
            "results": str(sweep.point_dir(point).relative_to(sweep.out)),
        })
    return rows


@dataclass(frozen=True)
class Cell:
    """The runs of one (mode, epsilon)."""

    mode: str
    epsilon: float
    accuracies: list[float]
    spent: list[float]
    outcomes: dict[str, int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def accuracy_text(self) -> str:
        if not self.accuracies:
            return "-"
        return f"{self.mean:.4f} ± {self.std:.4f}" if len(self.accuracies) > 1 else f"{self.mean:.4f}"


def cells(rows: Sequence[dict[str, Any]]) -> list[Cell]:
    """Runs grouped by (mode, epsilon), epsilons ascending with the non-private ones last."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["mode"], float(row["epsilon"])), []).append(row)
    out = []
    for (mode, eps), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "federated")):
        outcomes: dict[str, int] = {}
        for r in runs:
            key = r["stop-code"] or r["status"]
            outcomes[key] = outcomes.get(key, 0) + 1
        out.append(Cell(mode, eps, [float(r["final-accuracy"]) for r in runs if r["final-accuracy"] is not None],
                        [float(r["epsilon-spent"]) for r in runs if isinstance(r["epsilon-spent"], int | float)],
                        outcomes))
    return out


def _setting(cell: Cell, baseline: str) -> str:
    if math.isinf(cell.epsilon):
        return f"{cell.mode} non-private ({'clip-only' if baseline == 'clip-only' else '--no-dp'})"
    return f"{cell.mode} DP"


def _spent(cell: Cell) -> str:
    if not cell.spent:
        return "-"
    if any(math.isinf(x) for x in cell.spent):
        return "∞"
    return f"{statistics.fmean(cell.spent):.3f}"


def gap_sentence(table: list[Cell]) -> str:
    """The plain statement of how far each private setting at epsilon 8 (or the largest run) is from central
    non-private."""
    reference = next((c for c in table if c.mode == "central" and math.isinf(c.epsilon) and c.accuracies), None)
    finite = sorted({c.epsilon for c in table if math.isfinite(c.epsilon)})
    if reference is None or not finite:
        return ""
    eps = REFERENCE_EPSILON if REFERENCE_EPSILON in finite else finite[-1]
    parts = []
    for cell in (c for c in table if c.epsilon == eps and c.accuracies):
        gap = reference.mean - cell.mean
        parts.append(f"{cell.mode} DP at ε = {eps:g} reaches {cell.mean:.4f}, "
                     f"{abs(gap) * 100:.1f} points {'below' if gap >= 0 else 'above'} central non-private "
                     f"({reference.mean:.4f})")
    return ("Gap to central non-private: " + "; ".join(parts) + ".") if parts else ""


def markdown(rows: Sequence[dict[str, Any]], command: str, baseline: str, missing: Sequence[str] = ()) -> str:
    table = cells(rows)
    lines = [f"Produced by: `{command}`", "",
             "| setting | ε requested | ε spent (max over nodes, mean over runs) | held-out accuracy (mean ± std) "
             "| runs | outcome |", "|---|---|---|---|---|---|"]
    for c in table:
        outcome = ", ".join(f"{n} {k}" for k, n in sorted(c.outcomes.items()))
        lines.append(f"| {_setting(c, baseline)} | {'∞' if math.isinf(c.epsilon) else f'{c.epsilon:g}'} | "
                     f"{_spent(c)} | {c.accuracy_text()} | {len(c.accuracies)} | {outcome} |")
    majority = sorted({float(r["majority-accuracy"]) for r in rows if r.get("majority-accuracy") is not None})
    lines.append("")
    if majority:
        lines.append(f"Majority-class accuracy of the held-out set: {', '.join(f'{m:.4f}' for m in majority)} "
                     "(per seed's split).")
    if sentence := gap_sentence(table):
        lines.append("")
        lines.append(sentence)
    if missing:
        lines.append("")
        lines.append(f"Not finished ({len(missing)} of the grid's points, left out above): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, buf.getvalue())


def plot(path: Path, rows: Sequence[dict[str, Any]], baseline: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(rows)
    finite = sorted({c.epsilon for c in table if math.isfinite(c.epsilon)}) or [1.0]
    inf_x = finite[-1] * 2.5  # where the non-private runs are drawn
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("federated", "o-"), ("central", "s--")):
        mine = [c for c in table if c.mode == mode and c.accuracies]
        dp = [c for c in mine if math.isfinite(c.epsilon)]
        if dp:
            ax.errorbar([c.epsilon for c in dp], [c.mean for c in dp], yerr=[c.std for c in dp], fmt=style,
                        capsize=4, label=f"{mode} DP")
        for c in (c for c in mine if math.isinf(c.epsilon)):
            ax.errorbar([inf_x], [c.mean], yerr=[c.std], fmt=style[0], capsize=4, mfc="none",
                        label=f"{mode} non-private ({baseline})")
            if mode == "central":
                ax.axhline(c.mean, color="grey", linestyle=":", label=f"central non-private {c.mean:.3f}")
    majority = [float(r["majority-accuracy"]) for r in rows if r.get("majority-accuracy") is not None]
    if majority:
        ax.axhline(statistics.fmean(majority), color="red", linestyle="--", linewidth=0.8, label="majority class")
    ax.set_xscale("log")
    ticks = [*finite, inf_x]
    ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["∞"])
    ax.minorticks_off()
    ax.set(xlabel="ε per client (δ = the run's delta)", ylabel="held-out accuracy", title="Privacy-utility")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(sweep: Sweep, command: str) -> list[Path]:
    """Write sweep.csv, sweep.md and sweep.png into the sweep directory; return their paths."""
    rows = point_rows(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_csv(sweep.out / CSV_FILE, rows)
    from fedtune.sim.sweep import finished

    missing = [p.name for p in sweep.points if finished(sweep.point_dir(p)) is None]
    write_atomically(sweep.out / TABLE_FILE, markdown(rows, command, sweep.baseline, missing))
    return [sweep.out / CSV_FILE, sweep.out / TABLE_FILE, plot(sweep.out / PLOT_FILE, rows, sweep.baseline)]
