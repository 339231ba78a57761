"""fedtune-client's supervision (health, backoff), its logs and its Prometheus metrics."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from fedtune.client import daemon
from fedtune.client.monitoring import NodeCollector, reason_label
from fedtune.client.node_check import NodeOptions
from fedtune.client.supervisor import failing
from fedtune.common import logs, tls


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    rng = random.Random(0)
    delays = [daemon.backoff(n, rng=rng) for n in range(1, 10)]
    assert 1.5 <= delays[0] <= 2.5 and 3.0 <= delays[1] <= 5.0
    assert all(45.0 <= d <= 75.0 for d in delays[6:])  # capped at 60 s +-25%
    assert len({round(d, 6) for d in delays[6:]}) == 3  # jittered: nodes do not restart in lockstep


@pytest.mark.parametrize(("log", "expected"), [
    ("SuperNode ID: 1\nWARNING: Connection attempt failed, retrying in 2.5 seconds\n", True),
    ("Connection attempt failed, retrying\nSuperNode ID: 7\n", False),  # reconnected since
    ("SuperNode ID: 1\nReceived: train message\n", False),
    ("", False),
])
def test_a_supernode_is_failing_when_its_last_word_is_a_failed_connection(log: str, expected: bool) -> None:
    assert failing(log) is expected


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture) -> None:
    logs.setup("fedtune-client", "json")
    logging.getLogger("fedtune.client").warning("restart attempt %s in %.1fs: %s", 1, 2.0, "line\nbreak")
    (line,) = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["component"] == "fedtune-client"
    assert entry["message"] == "restart attempt 1 in 2.0s: line\\nbreak" and entry["time"].endswith("Z")
    logs.setup("fedtune-client", "text")
    logging.getLogger("fedtune.client").info("a\nb")
    assert capsys.readouterr().err.strip().endswith("INFO a\\nb")


def _entry(decision: str, epsilon: float, reason: str = "", when: str = "2026-11-30T10:00:00.000Z") -> dict:
    return {"seq": 1, "dataset": "notes-2026", "decision": decision, "epsilon": epsilon, "budget": 8.0,
            "reason": reason, "time": when, "extra": {"ignored": True}}


def test_node_metrics_come_from_its_own_ledger_and_files(tmp_path: Path) -> None:
    tls.create_ca(tmp_path / "ca")
    tls.create_node_keys(tmp_path / "keys")
    state = tmp_path / "state"
    state.mkdir()
    lines = [{"format": "header without a decision"}, _entry("charged", 2.5), _entry("charged", 5.0),
             _entry("refused", 5.0, "budget: this round would exceed the policy's max-epsilon 8.0")]
    (state / "ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn":')
    opts = NodeOptions(superlink="127.0.0.1:1", data=tmp_path, state_dir=state,
                       root_certificates=tmp_path / "ca/ca.pem", node_key=tmp_path / "keys/node.key")
    registry = CollectorRegistry()
    registry.register(NodeCollector(opts))
    text = generate_latest(registry).decode()
    for line in ('fedtune_node_epsilon_spent{budget_key="notes-2026"} 5.0',
                 'fedtune_node_epsilon_budget_left{budget_key="notes-2026"} 3.0',
                 "fedtune_node_rounds_trained_total 2.0", 'fedtune_node_rounds_refused_total{reason="budget"} 1.0',
                 "fedtune_node_ledger_entries 3.0", "fedtune_node_ledger_unparsable_lines 1.0"):
        assert line in text, text
    last = float(next(x for x in text.splitlines() if x.startswith("fedtune_node_last_good_round")).split()[-1])
    assert last == dt.datetime(2026, 11, 30, 10, tzinfo=dt.UTC).timestamp()
    days = float(next(x for x in text.splitlines() if x.startswith("fedtune_node_certificate_expiry_days")).split()[-1])
    assert 3640 < days < 3651


@pytest.mark.parametrize(("reason", "label"), [
    ("budget: projected epsilon 9.1 > max-epsilon 8.0", "budget"), ("noise multiplier 0.3 below the policy's "
                                                                     "min-noise-multiplier", "noise"),
    ("the plan asks for 500 steps, policy allows 100", "policy"), ("something new", "other")])
def test_refusal_reasons_become_a_few_bounded_labels(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def _node_opts(tmp_path: Path, port: int, **kw: object) -> NodeOptions:
    return NodeOptions(superlink=f"127.0.0.1:{port}", data=tmp_path, state_dir=tmp_path / "state", insecure=True,
                       **kw)  # type: ignore[arg-type]


def test_one_log_line_per_attempt_and_max_restarts_bound_the_attempts(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.client.supervisor import Supervisor
    from fedtune.common import exit_codes
    from fedtune.common.flower.processes import free_port

    sup = Supervisor(_node_opts(tmp_path, free_port(), max_restarts=3), backoff=lambda n: 0.01)
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        assert sup.run() == exit_codes.FAILED
    attempts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restart attempt")]
    assert [a.split()[2] for a in attempts] == ["1", "2", "3"]
    assert all("is unreachable" in a for a in attempts)
    assert "giving up after 4 failed attempts" in caplog.records[-1].getMessage()


def test_the_backoff_wait_ends_as_soon_as_the_server_answers_again(tmp_path: Path) -> None:
    import socket
    import threading
    import time

    from fedtune.client.supervisor import Supervisor
    from fedtune.common.flower.processes import free_port

    port = free_port()
    sup = Supervisor(_node_opts(tmp_path, port), backoff=lambda n: 60.0)
    server: list[socket.socket] = []
    threading.Timer(1.0, lambda: server.append(socket.create_server(("127.0.0.1", port)))).start()
    started = time.monotonic()
    try:
        sup._sleep(60.0, until_reachable=True)
    finally:
        for s in server:
            s.close()
    assert time.monotonic() - started < 15
