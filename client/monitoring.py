"""fedtune-client's Prometheus metrics, read at scrape time from the node's own files.

Served on the node's own network (localhost by default) for the hospital's
monitoring; nothing here is ever sent to the server. The ledger is read through
the ledger's bounded reader (``common/ledger/reader.py``: a file above its size
limit, a link or a FIFO is refused unread, an overlong line is skipped), but
tolerantly within it (the node verifies it before every round, the auditor
after): per entry ``dataset`` (the budget key), ``decision``, ``epsilon``
(cumulative), ``budget``, ``reason`` and ``time``; other fields and a header
line without a ``decision`` are ignored, and a line that does not parse is counted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtune.client.node_check import NodeOptions
from fedtune.common.ledger.chain import Problem
from fedtune.common.ledger.reader import read
from fedtune.common.ledger.schema import Entry
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


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class LedgerRound:
    """What the metrics show of one round entry, read tolerantly (None: absent, or not a number)."""

    dataset: str  # the budget key ("" when absent)
    charged: bool  # charged, else refused
    epsilon: float | None  # cumulative epsilon of dataset after the entry
    budget: float | None
    reason: str
    time: float | None  # Unix time of the entry

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> LedgerRound | None:
        """The round in a JSON object, or None for one without a decision (a header, a policy entry)."""
        if entry.get("decision") not in ("charged", "refused"):
            return None
        return cls(str(entry.get("dataset", "")), entry["decision"] == "charged", _number(entry.get("epsilon")),
                   _number(entry.get("budget")), str(entry.get("reason", "")), _timestamp(entry.get("time")))


@dataclass(frozen=True)
class LedgerReading:
    rounds: list[LedgerRound] = field(default_factory=list)
    unparsable: int = 0  # lines that are not JSON (a torn last line, an overlong or damaged line)
    file_problems: list[Problem] = field(default_factory=list)  # the file as a whole (refused unread, missing)


def _any_object(raw: bytes) -> str | Entry | None:
    """Any JSON object on a line (None: JSON, but not an object); the problem when the line is not JSON."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, an integer too long, absurd nesting
        return f"not JSON ({type(err).__name__})"
    return value if isinstance(value, dict) else None


def read_ledger(opts: NodeOptions) -> LedgerReading:
    """The rounds of the node's ledger, within the ledger's size limits; a file beyond them is not read."""
    parsed = read(opts.ledger_path, _any_object)
    rounds = [r for _, entry in parsed.entries if (r := LedgerRound.of(entry)) is not None]
    return LedgerReading(rounds, sum(p.line > 0 for p in parsed.problems), [p for p in parsed.problems if not p.line])


class NodeCollector(Collector):
    """Budget, rounds, ledger and certificate state of this node."""

    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts

    def collect(self) -> Iterator[Any]:
        reading = read_ledger(self.opts)
        entries = reading.rounds
        yield from self._budgets(entries)
        charged = [e for e in entries if e.charged]
        trained = CounterMetricFamily(PREFIX + "rounds_trained", "Rounds this node was charged for and trained")
        trained.add_metric([], len(charged))
        yield trained
        refused = CounterMetricFamily(PREFIX + "rounds_refused", "Rounds this node refused, by reason",
                                      labels=["reason"])
        for label, n in counts(reason_label(e.reason) for e in entries if not e.charged).items():
            refused.add_metric([label], n)
        yield refused
        last = GaugeMetricFamily(PREFIX + "last_good_round_timestamp_seconds",
                                 "Unix time of the last round this node trained")
        times = [e.time for e in charged if e.time is not None]
        if times:
            last.add_metric([], max(times))
        yield last
        size = GaugeMetricFamily(PREFIX + "ledger_entries", "Entries in the privacy ledger")
        size.add_metric([], len(entries))
        yield size
        damaged = GaugeMetricFamily(PREFIX + "ledger_unparsable_lines", "Ledger lines that are not JSON (torn?)")
        damaged.add_metric([], reading.unparsable)
        yield damaged
        yield from self._files()

    @staticmethod
    def _budgets(entries: list[LedgerRound]) -> Iterator[Any]:
        spent = GaugeMetricFamily(PREFIX + "epsilon_spent", "Cumulative epsilon charged, per budget key",
                                  labels=["budget_key"])
        left = GaugeMetricFamily(PREFIX + "epsilon_budget_left", "Epsilon left in the budget, per budget key",
                                 labels=["budget_key"])
        total = GaugeMetricFamily(PREFIX + "epsilon_budget", "The policy's epsilon budget, per budget key",
                                  labels=["budget_key"])
        per: dict[str, tuple[float, float | None]] = {}
        for e in entries:
            spent_so_far, budget = per.get(e.dataset, (0.0, None))
            if e.charged and e.epsilon is not None and math.isfinite(e.epsilon):
                spent_so_far = max(spent_so_far, e.epsilon)  # cumulative: the largest is the latest
            per[e.dataset] = (spent_so_far, e.budget or budget)
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
