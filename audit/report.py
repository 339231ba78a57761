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

from fedtune.audit.fleet import AuditReport
from fedtune.audit.ledger_audit import EntryAudit, Findings, LedgerAudit
from fedtune.common.privacy.accountant import COUNTERPART


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.4f}"


def _event(e: EntryAudit) -> tuple[str, str, str]:
    if e.event is None:
        return "-", "-", "-"
    return f"{e.event.noise_multiplier:.4g}", f"{e.event.sample_rate:.4g}", str(e.event.steps)


def _policies(ledger: LedgerAudit) -> str:
    """Every policy the ledger's entries were held to: budget, delta (always shown), accountant, dataset."""
    return "; ".join(f"{lim.source}: budget {lim.budget:g}, delta {lim.delta:g}, accountant {lim.accountant}"
                     + (f", dataset {lim.dataset[:24]}" if lim.dataset else "")
                     for lim in ledger.limits) or "no signed policy"


def _released(e: EntryAudit) -> str:
    return ",".join(e.released) or "-"


def ledger_table(ledger: LedgerAudit) -> Table:
    status = "[green]verified[/]" if ledger.ok else f"[red]{ledger.problems.total} problem(s)[/]"
    title = (f"{ledger.path}  node {ledger.node or '?'}  key {ledger.key or '?'}  {status}\n"
             f"policy: {_policies(ledger)}")
    table = Table(title=title, title_justify="left")
    left = ("time", "run", "dataset", "decision", "rng", "released")
    for name in ("line", "time", "run", "round", "dataset", "decision", "sigma", "q", "steps", "delta",
                 "epsilon (ledger)", "Opacus", "dp-accounting", "budget", "rng", "released"):
        table.add_column(name, justify="left" if name in left else "right")
    bad_lines = {p.line for p in ledger.problems.kept}
    for e in ledger.entries:
        style = "red" if e.line in bad_lines else ("yellow" if e.decision == "refused" else "")
        acc = f" ({e.accountant}/{COUNTERPART.get(e.accountant, '?')})"
        table.add_row(str(e.line), e.time, e.run[:12], str(e.round), e.dataset[:12], e.decision, *_event(e),
                      f"{e.delta:g}", _num(e.recorded), _num(e.opacus) + acc, _num(e.independent),
                      _num(e.budget), e.rng or "-", _released(e), style=style)
    return table


def _listing(ledger: LedgerAudit, findings: Findings, style: str) -> list[Text]:
    out = [Text(f"{ledger.path}: {p}", style=style) for p in findings.listed()]
    if findings.more:
        out.append(Text(f"{ledger.path}: ... and {findings.more} more", style=style))
    return out


def render(report: AuditReport) -> Group:
    """Tables per ledger, then every problem naming ledger and line (at most 20 each), then the verdict."""
    parts: list[Table | Text] = [ledger_table(ledger) for ledger in report.ledgers]
    for ledger in report.ledgers:
        parts += _listing(ledger, ledger.notices, "yellow")
        parts += _listing(ledger, ledger.problems, "red")
    for check in report.records:
        parts += [Text(f"{check.path}: {n}", style="yellow") for n in check.notices]
        if check.record is not None:
            parts.append(Text(f"{check.path}: {len(check.record.receipts)} receipts of run {check.record.run} "
                              "cross-checked"))
            if (level := check.record.client_level) is not None:
                parts.append(Text(f"{check.path}: client-level DP of the aggregate: epsilon {level['epsilon']:.4f} "
                                  f"at delta {level['delta']:g} over {level['rounds']} secure round(s); assumes "
                                  f"{level.get('trust', '')}"))
    parts += [Text(f"run record: {p}", style="red") for p in report.problems]
    verdict = ("all ledgers verified" if report.ok else "AUDIT FAILED") + (
        f" (budgets strict; tolerance {100 * report.tolerance:g}% between recorded and replayed epsilon)")
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
            if math.isfinite(entries[-1].budget):
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


HTML_HEAD = ("line", "time", "run", "round", "dataset", "decision", "sigma", "q", "steps", "delta",
             "epsilon (ledger)", "Opacus", "dp-accounting", "budget", "rng", "released", "reason")


def _html_rows(ledger: LedgerAudit) -> str:
    bad = {p.line for p in ledger.problems.kept}
    rows = []
    for e in ledger.entries:
        cells = [e.line, e.time, e.run, e.round, e.dataset[:16], e.decision, *_event(e), f"{e.delta:g}",
                 _num(e.recorded), _num(e.opacus), _num(e.independent), _num(e.budget), e.rng or "-",
                 _released(e), e.reason]
        cls = "bad" if e.line in bad else e.decision
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _html_list(findings: Findings) -> str:
    items = [f"<li>{html.escape(str(p))}</li>" for p in findings.listed()]
    if findings.more:
        items.append(f"<li>... and {findings.more} more</li>")
    return "".join(items)


def _html_section(ledger: LedgerAudit) -> str:
    policy = html.escape(_policies(ledger))
    return (f"<h2>{html.escape(str(ledger.path))}</h2><p>node <code>{html.escape(ledger.node or '?')}</code>, "
            f"signed by <code>{html.escape(ledger.key or '?')}</code>: <b>{'verified' if ledger.ok else 'FAILED'}"
            f"</b></p><p>policy: {policy}</p><ul class=\"notice\">{_html_list(ledger.notices)}</ul>"
            f"<ul>{_html_list(ledger.problems) or '<li>no problems</li>'}</ul>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in HTML_HEAD)}</tr>{_html_rows(ledger)}</table>")


def write_html(report: AuditReport, path: Path) -> Path:
    """A self-contained HTML report (plot embedded as a PNG data URI)."""
    png = base64.b64encode(plot_png(report)).decode()
    sections = [_html_section(ledger) for ledger in report.ledgers]
    record = "".join(f"<li>{html.escape(p)}</li>" for p in report.problems)
    if record:
        sections.append(f"<h2>Run record</h2><ul>{record}</ul>")
    verdict = "All ledgers verified" if report.ok else "Audit FAILED"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedtune privacy audit</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:0.85em}}
td,th{{border:1px solid #ccc;padding:2px 6px}} tr.refused{{background:#fff6d5}} tr.bad{{background:#fdd}}
ul.notice{{color:#8a6d00}}</style>
</head><body><h1>fedtune privacy audit: {verdict}</h1>
<p>Generated {dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}. Epsilon recomputed from each ledger's
DP events, at the policy's delta, with Opacus (the policy's accountant) and Google dp-accounting (PLD for PRV,
RDP for RDP). Budgets are strict; a tolerance of {100 * report.tolerance:g}% (relative) applies only to the
agreement between recorded and replayed epsilon.</p>
<img alt="cumulative epsilon over time" src="data:image/png;base64,{png}">
{''.join(sections)}</body></html>
"""
    path.write_text(page)
    return path
