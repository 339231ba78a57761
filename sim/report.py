"""Reading a results directory back: the per-round table and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.server.results import METRICS_FILE


def read_rounds(results_dir: Path) -> list[dict[str, Any]]:
    path = results_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf (no DP)"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="fedtune: per-round results (acc, loss: server's held-out set)")
    for col in ("round", "acc", "loss", "train loss", "client acc", "max eps", "mean eps", "ok/refused/failed"):
        table.add_column(col, justify="right")
    for r in rounds:
        clients = r.get("clients", [])
        counts = "/".join(str(sum(c.get("status") == s for c in clients)) for s in ("trained", "refused"))
        counts += "/" + str(sum(c.get("status") in ("error", "rejected") for c in clients))
        table.add_row(
            str(r["round"]), _fmt(r.get("accuracy")), _fmt(r.get("loss")), _fmt(r.get("train-loss")),
            _fmt(r.get("client-accuracy")), _fmt(r.get("epsilon-max"), 3), _fmt(r.get("epsilon-mean"), 3),
            counts if clients else "-",
        )
    return table


def plot(rounds: list[dict[str, Any]], out: Path, budget: float | None) -> Path:
    """metrics.png: held-out accuracy and per-client cumulative epsilon over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["round"] for r in rounds]
    ax_acc.plot(xs, [r.get("accuracy") for r in rounds], marker="o", label="held-out (server)")
    ax_acc.plot(xs, [r.get("client-accuracy") for r in rounds], marker="s", label="clients' local test")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    ax_acc.legend()
    per_client: dict[Any, list[tuple[int, float]]] = {}
    for r in rounds:
        for c in r.get("clients", []):
            eps = c.get("epsilon")
            if eps is not None and math.isfinite(eps):
                per_client.setdefault(c.get("partition-id", c.get("node-id")), []).append((r["round"], eps))
    for key, points in sorted(per_client.items(), key=lambda kv: str(kv[0])):
        ax_eps.plot(*zip(*points, strict=True), marker=".", label=f"client {key}")
    if budget is not None:
        ax_eps.axhline(budget, color="red", linestyle="--", label="budget")
    ax_eps.set(xlabel="round", ylabel="cumulative epsilon", title="Privacy spent per client")
    if per_client:
        ax_eps.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
