"""Secure aggregation in a real deployment: fedtune-server + three fedtune-client daemons on loopback TLS.

The run asks for ``secure-aggregation = true``: each round's training goes through Flower's SecAgg+ (four TRAIN
messages per node, each in a fresh ``flwr-clientapp`` process, the protocol's state kept by the SuperNode in the
run's context). Node c's policy requires secure aggregation (it refuses plain rounds), so it trains only because
the rounds really arrive through SecAgg+. Every round's sum holds the three trained updates; each node is charged
once per round, and the ledgers verify with fedtune-audit against the server's signed run record.

Marked slow: ~5 min on 2 shared cores (each SecAgg+ round is four clientapp processes per node, ~100-140 s).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.audit.cli import main as audit_main
from tests.integration.test_deploy import (
    RUN_TIMEOUT_S,
    Scenario,
    _audit_ledgers,
    _kill_group,
    _metrics,
    _prepare,
    _start,
    _wait_for,
)

pytestmark = pytest.mark.slow

ROUNDS = 2
NODES = "abc"


def _run(sc: Scenario) -> None:
    server = _start(sc.server_cmd(), sc.root / "server-1.out")
    sc.procs.append(server)
    _wait_for(sc.srv / "current-run.json", server, 120)  # SuperLink up, nodes registered, run submitted
    for name in sc.nodes:
        sc.procs.append(_start(sc.client_cmd(name, allowlist=sc.root / "allowed.txt", key=name),
                               sc.root / f"client-{name}.out"))
    try:
        sc.exit_codes["server"] = server.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sc.exit_codes["server"] = -1
    sc.first_run_id = json.loads((sc.srv / "current-run.json").read_text())["run-id"]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
           ) -> Iterator[Scenario]:
    sc = _prepare(tmp_path_factory.mktemp("deploy-secure"), tiny_model_dir, sentiment_csv, nodes=NODES,
                  rounds=ROUNDS)
    with open(sc.root / "run.toml", "a") as fh:
        fh.write("secure-aggregation = true\nsecagg-timeout = 90\n")
    with open(sc.node_dir("c") / "policy.toml", "a") as fh:
        fh.write("require-secure-aggregation = true\n")
    try:
        _run(sc)
        yield sc
    finally:
        for proc in reversed(sc.procs):
            _kill_group(proc, signal.SIGTERM)


def test_secure_rounds_complete_in_a_tls_deployment(secure: Scenario) -> None:
    out = (secure.root / "server-1.out").read_text()
    assert secure.exit_codes["server"] == 0, out[-3000:]
    rows = _metrics(secure)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        summed = row["secure-aggregation"]
        assert summed["aggregated"] is True, summed
        assert summed["nodes"] == summed["in-sum"] == summed["trained"] == len(NODES), summed
        assert sorted(c["status"] for c in row["clients"]) == ["trained"] * len(NODES), row["clients"]


def test_ledgers_verify_against_the_run_record_and_each_node_is_charged_once_per_round(
        secure: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(secure.first_run_id)
    for name, charged in _audit_ledgers(secure, NODES).items():
        assert charged == [(run, r) for r in range(1, ROUNDS + 1)], f"node {name}: {charged}"
    results = secure.srv / "results"
    args = [str(secure.node_dir(n) / "state") for n in NODES]
    args += [a for n in NODES for a in ("-k", str(secure.certs / "nodes" / n / "ledger-signing.pub"))]
    args += [a for n in NODES for a in ("--policy", str(secure.node_dir(n) / "policy.toml"))]
    args += ["--server-record", str(results), "--server-key", str(results / "server-record.pub")]
    code = audit_main(args)
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"{ROUNDS * len(NODES)} receipts of run {run} cross-checked" in text, text
