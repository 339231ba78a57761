"""The run report's figures: matplotlib (Agg) rendered to PNG bytes, inlined by ``server/report.py``."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from fedtune.server.results import node_name


def _figure(width: float = 6.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # no tool URL inside the PNG
    plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def accuracy_plot(rounds: Sequence[dict[str, Any]]) -> bytes:
    fig, ax = _figure()
    for key, label, marker in (("accuracy", "held-out (server)", "o"), ("client-accuracy", "clients' local test", "s")):
        points = [(r["round"], r[key]) for r in rounds if _finite(r.get(key))]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    ax.set(xlabel="round", ylabel="accuracy", title="Accuracy per round")
    ax.legend(fontsize="small")
    return _png(fig)


def epsilon_plot(rounds: Sequence[dict[str, Any]], budget: float | None) -> bytes:
    """Each node's cumulative epsilon per round, with its own reported budget (or the run's)."""
    fig, ax = _figure()
    per_node: dict[str, list[tuple[int, float]]] = {}
    budgets: dict[str, float] = {}
    for r in rounds:
        for row in r.get("clients", []):
            if _finite(row.get("epsilon")):
                per_node.setdefault(node_name(row), []).append((r["round"], float(row["epsilon"])))
            if _finite(row.get("epsilon-budget")):
                budgets[node_name(row)] = float(row["epsilon-budget"])
    for i, (name, points) in enumerate(sorted(per_node.items())):
        line = ax.plot(*zip(*points, strict=True), marker=".", label=name)[0]
        if name in budgets and budgets[name] != budget:
            ax.axhline(budgets[name], color=line.get_color(), linestyle=":", linewidth=1)
        if i >= 11:
            break
    if budget is not None:
        ax.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g}")
    if not per_node:
        ax.text(0.5, 0.5, "no finite epsilon reported (trained without DP)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="Privacy spent per node")
    if ax.get_legend_handles_labels()[0]:  # nothing to label without DP
        ax.legend(fontsize="x-small", ncol=2)
    return _png(fig)


def per_label_plot(per_label: dict[str, dict[str, Any]]) -> bytes:
    import numpy as np

    fig, ax = _figure()
    labels = list(per_label)
    xs = np.arange(len(labels))
    for offset, key in ((-0.2, "precision"), (0.2, "recall")):
        values = [per_label[k].get(key) if _finite(per_label[k].get(key)) else 0.0 for k in labels]
        bars = ax.bar(xs + offset, values, width=0.4, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(xs, labels, rotation=30 if len(labels) > 4 else 0)
    ax.set(ylim=(0, 1.1), ylabel="score", title="Per-label precision and recall (held-out, last round)")
    ax.legend(fontsize="small")
    return _png(fig)


def confusion_plot(confusion: list[list[int]], labels: Sequence[str], title: str = "Confusion matrix") -> bytes:
    import numpy as np

    cm = np.asarray(confusion)
    fig, ax = _figure(4.6, 4.0)
    ax.imshow(cm, cmap="Blues")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _png(fig)


def group_plot(groups: dict[str, dict[str, Any]], overall: float | None, limit: int = 20) -> bytes:
    """Accuracy of the ``limit`` largest groups, against the overall accuracy."""
    largest = sorted(groups.items(), key=lambda kv: (-kv[1]["num-examples"], kv[0]))[:limit]
    fig, ax = _figure(6.0, max(2.5, 0.3 * len(largest) + 1.2))
    names = [f"{g} (n={v['num-examples']})" for g, v in largest]
    ax.barh(names[::-1], [v["accuracy"] for _, v in largest][::-1], color="tab:purple")
    if overall is not None:
        ax.axvline(overall, color="black", linestyle="--", label=f"overall {overall:.3f}")
        ax.legend(fontsize="small")
    ax.set(xlim=(0, 1), xlabel="accuracy", title=f"Held-out accuracy per group ({len(largest)} largest)")
    return _png(fig)


def bytes_plot(rounds: Sequence[dict[str, Any]]) -> bytes:
    fig, ax = _figure()
    keys = sorted({k for r in rounds for k in r if k.startswith("bytes") and _finite(r[k])})
    for key in keys:
        points = [(r["round"], r[key] / 1e6) for r in rounds if _finite(r.get(key))]
        ax.plot(*zip(*points, strict=True), marker="o", label=key)
    ax.set(xlabel="round", ylabel="MB", title="Bytes per round")
    ax.legend(fontsize="small")
    return _png(fig)
