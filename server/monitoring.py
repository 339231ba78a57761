"""fedtune-server's Prometheus metrics, read at scrape time from the run's metrics.jsonl.

Each metrics.jsonl line is one round with a row per client: ``status``
(trained / refused / rejected / error), and where the ServerApp records them, an
error ``code`` and the update's ``bytes``. Absent fields are simply not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fedtune.common.monitoring import serve
from fedtune.server.federation import Federation
from fedtune.server.results import read_rounds

PREFIX = "fedtune_server_"


def trained_rounds(fed: Federation) -> list[dict[str, Any]]:
    """The run's round lines after round 0 (round 0 evaluates the initial adapter: no node trained)."""
    return [line for line in read_rounds(fed.opts.results_dir) if line["round"] > 0]


def _reply_label(client: dict[str, Any]) -> tuple[str, str]:
    status = str(client.get("status", "unknown"))
    outcome = "accepted" if status == "trained" else "refused"
    code = client.get("code")
    return outcome, str(code) if code is not None else status


class ServerCollector(Collector):
    """Rounds, nodes, replies and bytes of the run this fedtune-server follows."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def collect(self) -> Iterator[Any]:
        rounds = trained_rounds(self.fed)
        clients = [c for r in rounds for c in r.get("clients", []) if isinstance(c, dict)]
        failed = sum(1 for r in rounds if not any(c.get("status") == "trained" for c in r.get("clients", [])))
        done = CounterMetricFamily(PREFIX + "rounds", "Rounds finished, by result (failed: no node's update "
                                   "was aggregated)", labels=["result"])
        done.add_metric(["completed"], len(rounds) - failed)
        done.add_metric(["failed"], failed)
        yield done
        nodes = GaugeMetricFamily(PREFIX + "nodes_connected", "Registered nodes online at the last count")
        if self.fed.online is not None:
            nodes.add_metric([], self.fed.online)
        yield nodes
        yield from self._durations(rounds)
        replies = CounterMetricFamily(PREFIX + "replies", "Node replies, accepted (aggregated) or refused, by "
                                      "code (or status when the reply carried no code)", labels=["outcome", "code"])
        for (outcome, code), n in _pairs(clients).items():
            replies.add_metric([outcome, code], n)
        yield replies
        received = CounterMetricFamily(PREFIX + "received_bytes", "Bytes of node updates received")
        received.add_metric([], sum(float(c["bytes"]) for c in clients if isinstance(c.get("bytes"), int | float)))
        yield received
        last = GaugeMetricFamily(PREFIX + "last_round", "Number of the last finished round")
        last.add_metric([], max((int(r["round"]) for r in rounds), default=0))
        yield last

    @staticmethod
    def _durations(rounds: list[dict[str, Any]]) -> Iterator[Any]:
        elapsed = [float(r["elapsed-s"]) for r in rounds if isinstance(r.get("elapsed-s"), int | float)]
        steps = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False) if b >= a]
        gauge = GaugeMetricFamily(PREFIX + "round_duration_seconds", "Wall time of the last finished round")
        if steps:
            gauge.add_metric([], steps[-1])
        yield gauge
        total = CounterMetricFamily(PREFIX + "round_duration_seconds_total", "Wall time of all finished rounds")
        total.add_metric([], sum(steps))
        yield total


def _pairs(clients: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for client in clients:
        key = _reply_label(client)
        out[key] = out.get(key, 0) + 1
    return out


def serve_metrics(address: str, fed: Federation) -> None:
    serve(address, ServerCollector(fed))
