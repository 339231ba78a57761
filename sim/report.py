"""Reading a results directory back: the per-round table, the plot, and the run report with the audit.

``write_run_report(results_dir)`` is what ``fedtune-sim`` calls at the end of a run: in simulation
the nodes' ledgers sit beside the results, so the report carries the audit's verdict.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.audit.fleet import audit
from fedtune.audit.ledger_audit import LedgerSpec
from fedtune.audit.policy import read_policy
from fedtune.audit.roster import read_roster
from fedtune.common.durable import write_atomically
from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.key import load_public_key
from fedtune.server.report import CONFIG_FILE, AuditVerdict, write_report
from fedtune.server.results import node_name, portable
from fedtune.server.run_record import PUBLIC_FILE
from fedtune.sim.nodes import ROSTER_FILE

__all__ = ["audit_verdict", "plot", "round_table", "write_run_report"]


def audit_verdict(results_dir: Path) -> AuditVerdict:
    """Audit the simulated nodes' ledgers in-process, as ``fedtune-audit --roster clients/roster.toml
    --server-record RUN_DIR`` would: signatures, binding to each node and its policy, epsilon recomputed,
    and every receipt in the server's signed run record found in the ledgers."""
    roster_path = results_dir / "clients" / ROSTER_FILE
    if not roster_path.is_file():
        return AuditVerdict(None, "no node roster beside these results")
    try:
        roster = read_roster(roster_path)
        table = {n.node: n.key for n in roster}
        specs = [LedgerSpec(n.ledger, n.node, read_policy(n.policy) if n.policy else None, table)
                 for n in roster if n.ledger is not None and n.ledger.is_file()]
        if not specs:
            return AuditVerdict(None, "no node ledgers beside these results")
        record = results_dir if (results_dir / PUBLIC_FILE).is_file() else None
        report = audit(specs, {n.key: n.public_key for n in roster}, record_dir=record,
                       server_key=load_public_key(results_dir / PUBLIC_FILE) if record else None)
    except FedtuneError as err:
        return AuditVerdict(False, f"the audit could not run: {err}")
    dirs = [s.path.parent for s in specs]
    rows = []
    for d, ledger in zip(dirs, report.ledgers, strict=True):
        last = ledger.entries[-1] if ledger.entries else None
        rows.append({"ledger": d.name, "ok": ledger.ok, "entries": len(ledger.entries),
                     "epsilon": last.recorded if last else None, "opacus": last.opacus if last else None,
                     "dp-accounting": last.independent if last else None,
                     "problems": [f"line {p.line}: {p.message}" for p in ledger.problems.listed()]})
    bad = [r["ledger"] for r in rows if not r["ok"]]
    summary = (f"all {len(rows)} ledgers verified: chains, signatures, epsilon recomputed with Opacus and "
               f"dp-accounting within tolerance {report.tolerance:g}, every epsilon within its budget"
               if report.ok else f"{len(bad)} of {len(rows)} ledgers have problems: {', '.join(bad)}"
               if bad else "the server's run record disagrees with the ledgers: " + "; ".join(report.problems))
    return AuditVerdict(bool(report.ok), summary, rows)


def write_run_report(results_dir: Path) -> Path:
    """Write ``results_dir/report.html`` with the audit's verdict; returns its path.

    Also rewrites ``config.json`` without absolute paths (paths become their last component) if it
    has any, so that no artifact of the run names a path of this machine.
    """
    config = results_dir / CONFIG_FILE
    if config.is_file():
        raw = json.loads(config.read_text())
        if portable(raw) != raw:
            write_atomically(config, json.dumps(portable(raw), indent=2) + "\n")
    return write_report(results_dir, audit_verdict(results_dir))


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


MAX_CLIENT_LINES = 20  # more clients: the epsilon plot shows their max, median and min per round


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
                per_client.setdefault(node_name(c), []).append((r["round"], eps))
    if len(per_client) <= MAX_CLIENT_LINES:
        for key, points in sorted(per_client.items(), key=lambda kv: str(kv[0])):
            ax_eps.plot(*zip(*points, strict=True), marker=".", label=f"client {key}")
    else:  # thousands of lines (and their legend) took matplotlib minutes: the spread over clients instead
        by_round: dict[int, list[float]] = {}
        for points in per_client.values():
            for rnd, eps in points:
                by_round.setdefault(rnd, []).append(eps)
        xs_eps = sorted(by_round)
        for name, pick in (("max", max), ("median", statistics.median), ("min", min)):
            ax_eps.plot(xs_eps, [pick(by_round[x]) for x in xs_eps], marker=".",
                        label=f"{name} of {len(per_client):,} clients")
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
