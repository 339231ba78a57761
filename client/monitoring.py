"""fedtune-client's Prometheus metrics, read at scrape time from the node's own files.

Served on the node's own network (localhost by default) for the hospital's
monitoring; nothing here is ever sent to the server. The ledger is read
tolerantly (it is verified by the node before every round and by the auditor):
per entry ``dataset`` (the budget key), ``decision``, ``epsilon`` (cumulative),
``budget``, ``reason`` and ``time``; other fields and a header line without a
``decision`` are ignored, and a line that does not parse is counted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtune.client.node_check import NodeOptions
from fedtune.common.monitoring import counts, serve
from fedtune.common.tls import cert_days_left

PREFIX = "fedtune_node_"
REASONS = (("noise", "noise"), ("budget", "budget"), ("exhaust", "budget"), ("epsilon", "budget"),
           ("policy", "policy"), ("step", "policy"), ("delta", "policy"), ("dp", "policy"))


def reason_label(reason: str) -> str:
    """A bounded label for a refusal reason (the full text stays in the ledger)."""
    low = reason.lower()
    return next((label for word, label in REASONS if word in low), "other")


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def read_ledger(opts: NodeOptions) -> tuple[list[dict[str, Any]], int]:
    """(entries with a decision, lines that did not parse)."""
    try:
        lines = opts.ledger_path.read_bytes().splitlines()
    except OSError:
        return [], 0
    entries, bad = [], 0
    for line in lines:
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(entry, dict) and entry.get("decision") in ("charged", "refused"):
            entries.append(entry)
    return entries, bad


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class NodeCollector(Collector):
    """Budget, rounds, ledger and certificate state of this node."""

    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts

    def collect(self) -> Iterator[Any]:
        entries, bad = read_ledger(self.opts)
        yield from self._budgets(entries)
        charged = [e for e in entries if e["decision"] == "charged"]
        trained = CounterMetricFamily(PREFIX + "rounds_trained", "Rounds this node was charged for and trained")
        trained.add_metric([], len(charged))
        yield trained
        refused = CounterMetricFamily(PREFIX + "rounds_refused", "Rounds this node refused, by reason",
                                      labels=["reason"])
        for label, n in counts(reason_label(str(e.get("reason", ""))) for e in entries
                               if e["decision"] == "refused").items():
            refused.add_metric([label], n)
        yield refused
        last = GaugeMetricFamily(PREFIX + "last_good_round_timestamp_seconds",
                                 "Unix time of the last round this node trained")
        times = [t for e in charged if (t := _timestamp(e.get("time"))) is not None]
        if times:
            last.add_metric([], max(times))
        yield last
        size = GaugeMetricFamily(PREFIX + "ledger_entries", "Entries in the privacy ledger")
        size.add_metric([], len(entries))
        yield size
        damaged = GaugeMetricFamily(PREFIX + "ledger_unparsable_lines", "Ledger lines that are not JSON (torn?)")
        damaged.add_metric([], bad)
        yield damaged
        yield from self._files()

    @staticmethod
    def _budgets(entries: list[dict[str, Any]]) -> Iterator[Any]:
        spent = GaugeMetricFamily(PREFIX + "epsilon_spent", "Cumulative epsilon charged, per budget key",
                                  labels=["budget_key"])
        left = GaugeMetricFamily(PREFIX + "epsilon_budget_left", "Epsilon left in the budget, per budget key",
                                 labels=["budget_key"])
        total = GaugeMetricFamily(PREFIX + "epsilon_budget", "The policy's epsilon budget, per budget key",
                                  labels=["budget_key"])
        per: dict[str, tuple[float, float | None]] = {}
        for e in entries:
            key = str(e.get("dataset", ""))
            spent_so_far, budget = per.get(key, (0.0, None))
            eps = _number(e.get("epsilon"))
            if e["decision"] == "charged" and eps is not None and math.isfinite(eps):
                spent_so_far = max(spent_so_far, eps)  # cumulative: the largest is the latest
            per[key] = (spent_so_far, _number(e.get("budget")) or budget)
        for key, (eps, budget) in per.items():
            spent.add_metric([key], eps)
            if budget is not None:
                left.add_metric([key], max(0.0, budget - eps))
                total.add_metric([key], budget)
        yield from (spent, left, total)

    def _files(self) -> Iterator[Any]:
        expiry = GaugeMetricFamily(PREFIX + "certificate_expiry_days",
                                   "Days until the CA certificate this node trusts expires", labels=["file"])
        if self.opts.root_certificates is not None and (days := cert_days_left(self.opts.root_certificates)):
            expiry.add_metric([str(self.opts.root_certificates)], days)
        yield expiry
        age = GaugeMetricFamily(PREFIX + "key_age_days", "Age of the node's authentication key file")
        if self.opts.node_key is not None:
            with contextlib.suppress(OSError):
                age.add_metric([], (time.time() - self.opts.node_key.stat().st_mtime) / 86400)
        yield age


def serve_metrics(address: str, opts: NodeOptions) -> None:
    serve(address, NodeCollector(opts))
