"""Human-readable audit output: rich tables for the terminal, an HTML report with a plot."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedtune.common.accounting import COUNTERPART
from fedtune.common.audit import AuditReport, EntryAudit, LedgerAudit


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.4f}"


def _event(e: EntryAudit) -> tuple[str, str, str]:
    if e.event is None:
        return "-", "-", "-"
    return f"{e.event.noise_multiplier:.4g}", f"{e.event.sample_rate:.4g}", str(e.event.steps)


def ledger_table(ledger: LedgerAudit) -> Table:
    status = "[green]verified[/]" if ledger.ok else f"[red]{len(ledger.problems)} problem(s)[/]"
    table = Table(title=f"{ledger.path}  key {ledger.key or '?'}  {status}", title_justify="left")
    for name in ("line", "time", "run", "round", "dataset", "decision", "sigma", "q", "steps",
                 "epsilon (ledger)", "Opacus", "dp-accounting", "budget"):
        table.add_column(name, justify="right" if name not in ("time", "run", "dataset", "decision") else "left")
    bad_lines = {p.line for p in ledger.problems}
    for e in ledger.entries:
        style = "red" if e.line in bad_lines else ("yellow" if e.decision == "refused" else "")
        acc = f" ({e.accountant}/{COUNTERPART.get(e.accountant, '?')})"
        table.add_row(str(e.line), e.time, e.run[:12], str(e.round), e.dataset[:12], e.decision, *_event(e),
                      _num(e.recorded), _num(e.opacus) + acc, _num(e.independent), f"{e.budget:g}", style=style)
    return table


def render(report: AuditReport) -> Group:
    """Tables per ledger, then every problem naming ledger and line, then the verdict."""
    parts: list[Table | Text] = [ledger_table(ledger) for ledger in report.ledgers]
    for ledger in report.ledgers:
        for p in ledger.problems:
            parts.append(Text(f"{ledger.path}: {p}", style="red"))
    verdict = ("all ledgers verified" if report.ok else "AUDIT FAILED") + (
        f" (tolerance {100 * report.tolerance:g}% between accountants)")
    parts.append(Text(verdict, style="bold green" if report.ok else "bold red"))
    return Group(*parts)


def _when(stamp: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def plot_png(report: AuditReport) -> bytes:
    """Cumulative epsilon over time, one line per (ledger, dataset), budgets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for ledger in report.ledgers:
        for dataset, entries in ledger.datasets().items():
            points = [(t, e.recorded) for e in entries if (t := _when(e.time)) and math.isfinite(e.recorded)]
            if not points:
                continue
            label = f"{ledger.path.parent.name}/{ledger.path.name} [{dataset[:8]}]"
            (line,) = ax.plot(*zip(*points, strict=True), marker="o", drawstyle="steps-post", label=label)
            ax.axhline(entries[-1].budget, linestyle="--", color=line.get_color(), alpha=0.6)
            refused = [(t, e.recorded) for e in entries if e.decision == "refused" and (t := _when(e.time))]
            if refused:
                ax.scatter(*zip(*refused, strict=True), marker="x", color="red", zorder=3)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent per node and dataset (dashed: budget, x: refused)")
    ax.legend(fontsize="small")
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html_rows(ledger: LedgerAudit) -> str:
    bad = {p.line for p in ledger.problems}
    rows = []
    for e in ledger.entries:
        cells = [e.line, e.time, e.run, e.round, e.dataset[:16], e.decision, *_event(e), _num(e.recorded),
                 _num(e.opacus), _num(e.independent), f"{e.budget:g}", e.reason]
        cls = "bad" if e.line in bad else e.decision
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def write_html(report: AuditReport, path: Path) -> Path:
    """A self-contained HTML report (plot embedded as a PNG data URI)."""
    png = base64.b64encode(plot_png(report)).decode()
    head = ("line", "time", "run", "round", "dataset", "decision", "sigma", "q", "steps", "epsilon (ledger)",
            "Opacus", "dp-accounting", "budget", "reason")
    sections = []
    for ledger in report.ledgers:
        problems = "".join(f"<li>{html.escape(str(p))}</li>" for p in ledger.problems) or "<li>none</li>"
        sections.append(
            f"<h2>{html.escape(str(ledger.path))}</h2><p>signed by <code>{html.escape(ledger.key or '?')}</code>: "
            f"<b>{'verified' if ledger.ok else 'FAILED'}</b></p><ul>{problems}</ul>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{_html_rows(ledger)}</table>")
    verdict = "All ledgers verified" if report.ok else "Audit FAILED"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedtune privacy audit</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:0.85em}}
td,th{{border:1px solid #ccc;padding:2px 6px}} tr.refused{{background:#fff6d5}} tr.bad{{background:#fdd}}</style>
</head><body><h1>fedtune privacy audit: {verdict}</h1>
<p>Generated {dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}. Epsilon recomputed from each ledger's
DP events with Opacus (the node's accountant) and Google dp-accounting (PLD for PRV, RDP for RDP);
tolerance {100 * report.tolerance:g}% (relative).</p>
<img alt="cumulative epsilon over time" src="data:image/png;base64,{png}">
{''.join(sections)}</body></html>
"""
    path.write_text(page)
    return path
