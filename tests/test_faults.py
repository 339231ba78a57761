"""Faults on a loopback deployment (TLS, node auth, app pinning) and in fedtune-sim.

Marker ``faults`` (excluded from the default suite; minutes on 2 cores):

    .venv/bin/python -m pytest -m faults tests/test_faults.py

- the server is SIGKILLed after round 1 and restarted: both nodes rejoin and train
  round 2 with no human action (the time to rejoin is printed);
- a node is killed mid-run: the run does not stall; it stops at the deadline
  (exit 4, summary says why), and resumes to completion once the node is back;
- budgets run out mid-run: exit 3 and the refusal is in the node's ledger;
- SIGTERM to fedtune-sim: exit 143, the run's log is kept, no Flower process is left
  (checked by process group and by owner tag);
- a torn ledger: ``fedtune-client --check`` fails naming the line;
- secure aggregation (SecAgg+): a node killed right after its charge in the masked-vector stage is dropped and
  the round completes with the 3 survivors (threshold 3 of 4); with 3 nodes and threshold 3, a node killed at
  the start of the unmask stage makes the round fail cleanly (no aggregate, a reason, the run ends, exit 1:
  nothing was aggregated), and no node is charged twice.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedtune.common import exit_codes
from fedtune.common.flower.processes import free_port, owned_pids
from fedtune.common.ledger.entry import ACCOUNTING_KINDS
from fedtune.common.privacy.accountant import accountant_record
from tests.faults_helpers import kill_owned, kill_session, session_pids, start, wait_until
from tests.tiny import make_sentiment_frame

pytestmark = pytest.mark.faults
BIN = Path(sys.executable).parent
RUN_S = 420
ROUND_TIMEOUT_S = 120  # fedtune-server --round-timeout of these deployments
STOP_GRACE_S = 60  # how long fedtune-server waits for Flower to stop a stalled run (server/federation.py)


@dataclass
class Deployment:
    root: Path
    rounds: int
    policy: str = "max-epsilon = 8.0\ndelta = 1e-5\ndataset-id = \"notes\"\n"
    nodes: str = "ab"  # every node gets certificates, 200 rows and the policy; min-clients = all of them
    settings: str = ""  # more run settings (TOML lines)
    rows: dict[str, int] = field(default_factory=dict)  # a node's rows, instead of 200
    server_port: int = field(default_factory=free_port)
    procs: dict[str, object] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def srv(self) -> Path:
        return self.root / "srv"

    def node_dir(self, name: str) -> Path:
        return self.root / f"node-{name}"

    def prepare(self, model: Path, dataset: Path) -> Deployment:
        import subprocess

        subprocess.run([str(BIN / "fedtune-certs"), "dev", "--out", str(self.certs),
                        *[a for n in self.nodes for a in ("--node", n)]], check=True, capture_output=True)
        frame = make_sentiment_frame(200 * len(self.nodes), seed=3)
        for i, name in enumerate(self.nodes):
            d = self.node_dir(name)
            d.mkdir()
            rows = frame.iloc[i * 200:(i + 1) * 200]
            if name in self.rows:
                rows = make_sentiment_frame(self.rows[name], seed=10 + i)
            rows.to_csv(d / "data.csv", index=False)
            key = self.certs / "nodes" / name / "ledger-signing.key"
            (d / "policy.toml").write_text(f'{self.policy}ledger-key = "{key}"\n')
        (self.root / "run.toml").write_text(
            f'model-path = "{model}"\ndataset = "{dataset}"\npartition-by = "group"\nmax-seq-len = 16\n'
            f"batch-size = 32\nlearning-rate = 0.05\nnum-rounds = {self.rounds}\nmin-clients = {len(self.nodes)}\n"
            f"{self.settings}")
        app_hash = subprocess.run([str(BIN / "fedtune-server"), "--work-dir", str(self.srv), "--print-app-hash"],
                                  check=True, capture_output=True, text=True).stdout.strip()
        (self.root / "allowed.txt").write_text(f"{app_hash}\n")
        return self

    def start_server(self, label: str, *extra: str) -> object:
        c = self.certs
        cmd = [str(BIN / "fedtune-server"), "--ssl-ca-certfile", str(c / "ca/ca.pem"), "--ssl-certfile",
               str(c / "server/server.pem"), "--ssl-keyfile", str(c / "server/server.key"), "--node-keys",
               str(c / "nodes"), "--run-config", str(self.root / "run.toml"), "--work-dir", str(self.srv),
               "--port", str(self.server_port), "--metrics-address", "off", "--node-wait-timeout", "40",
               "--round-timeout", str(ROUND_TIMEOUT_S), *extra]
        self.procs[label] = proc = start(cmd, self.root / f"{label}.out")
        return proc

    def start_node(self, name: str) -> object:
        d = self.node_dir(name)
        cmd = [str(BIN / "fedtune-client"), "--superlink", f"127.0.0.1:{self.server_port}", "--root-certificates",
               str(self.certs / "ca/ca.pem"), "--node-key", str(self.certs / "nodes" / name / "node.key"),
               "--data", str(d / "data.csv"), "--labels", "neg,pos", "--state-dir", str(d / "state"),
               "--policy", str(d / "policy.toml"), "--app-allowlist", str(self.root / "allowed.txt"),
               "--runtime-port", str(free_port()),
               "--metrics-address", "off", "--stall-timeout", "30"]
        self.procs[f"node-{name}"] = proc = start(cmd, self.root / f"node-{name}.out")
        return proc

    def kill_node(self, name: str) -> None:
        kill_session(self.procs.pop(f"node-{name}"))  # type: ignore[arg-type]
        kill_owned(f"fedtune-client:{(self.node_dir(name) / 'state').resolve()}")

    def rounds_done(self) -> list[dict]:
        path = self.srv / "results" / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def ledger(self, name: str) -> list[dict]:
        path = self.node_dir(name) / "state" / "ledger.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e["kind"] in ACCOUNTING_KINDS]  # no header/policy entries

    def charges(self, name: str) -> list[tuple[str, int]]:
        """The (run, round) pairs the node's ledger charged."""
        return [(str(e["run"]), int(e["round"])) for e in self.ledger(name) if e["decision"] == "charged"]

    def charged_in(self, name: str, server_round: int) -> bool:
        """Whether the node's ledger holds a charge for the round (read while the node may be appending)."""
        path = self.node_dir(name) / "state" / "ledger.jsonl"
        text = path.read_text() if path.exists() else ""
        complete = text[:text.rfind("\n") + 1].splitlines()  # a line being written is not read
        return any(e.get("decision") == "charged" and e.get("round") == server_round for e in map(json.loads, complete))

    def app_tasks(self, name: str) -> int:
        """Tasks the node's app gate acquired so far (one line each; one per Flower message)."""
        path = self.node_dir(name) / "state" / "app-decisions.jsonl"
        return path.read_text().count("\n") if path.exists() else 0

    def activations(self, name: str) -> int:
        path = self.node_dir(name) / "state" / "supernode.log"
        return path.read_text(errors="replace").count("SuperNode ID:") if path.exists() else 0

    def stop_all(self) -> None:
        for proc in list(self.procs.values())[::-1]:
            kill_session(proc)  # type: ignore[arg-type]
        kill_owned(f"fedtune-server:{self.srv.resolve()}")
        for name in self.nodes:
            kill_owned(f"fedtune-client:{(self.node_dir(name) / 'state').resolve()}")


def _wait_exit(proc, timeout_s: float = RUN_S) -> int:  # noqa: ANN001
    return int(proc.wait(timeout=timeout_s))


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
              ) -> Iterator[tuple[Deployment, dict[str, Any]]]:
    """Server killed after round 1 and restarted; node b killed after round 2; then b and the server again."""
    dep = Deployment(tmp_path_factory.mktemp("faults-restart"), rounds=3).prepare(tiny_model_dir, sentiment_csv)
    facts: dict[str, Any] = {}
    try:
        server = dep.start_server("server-1")
        wait_until("run submitted", (dep.srv / "current-run.json").exists, 120, server)
        dep.start_node("a"), dep.start_node("b")
        wait_until("round-1 checkpoint", (dep.srv / "checkpoints" / "round-0001").exists, RUN_S, server)
        kill_session(server)  # the whole server crashes
        before = {n: dep.activations(n) for n in "ab"}
        time.sleep(3)
        restarted_at = time.monotonic()
        server = dep.start_server("server-2")
        wait_until("both nodes rejoined", lambda: all(dep.activations(n) > before[n] for n in "ab"), RUN_S, server)
        facts["rejoin-s"] = time.monotonic() - restarted_at
        wait_until("round-2 checkpoint", (dep.srv / "checkpoints" / "round-0002").exists, RUN_S, server)
        facts["round-2-after-restart-s"] = time.monotonic() - restarted_at
        dep.kill_node("b")  # a node dies for good in round 3
        killed_at = time.monotonic()
        facts["server-2"] = _wait_exit(server)
        facts["stopped-after-s"] = time.monotonic() - killed_at
        facts["summary-2"] = json.loads((dep.srv / "results" / "summary.json").read_text())
        facts["rounds-2"] = [r["round"] for r in dep.rounds_done()]
        dep.start_node("b")
        facts["server-3"] = _wait_exit(dep.start_server("server-3"))
        print(f"\nfault timings: {json.dumps({k: v for k, v in facts.items() if k.endswith('-s')})}")
        yield dep, facts
    finally:
        dep.stop_all()


def test_nodes_rejoin_a_restarted_server_and_train_the_next_round(restarted) -> None:  # noqa: ANN001
    dep, facts = restarted
    round2 = next(r for r in dep.rounds_done() if r["round"] == 2)
    assert sorted(c["status"] for c in round2["clients"]) == ["trained", "trained"], round2["clients"]
    assert facts["rejoin-s"] < 300


def test_a_dead_node_stops_the_run_at_the_deadline_and_it_resumes(restarted) -> None:  # noqa: ANN001
    dep, facts = restarted
    out = (dep.root / "server-2.out").read_text()
    # Node b died in round 3, so round 3 cannot finish: the server stops the run (exit 4), it does not hang.
    b_round_3 = [e for e in dep.ledger("b") if e.get("round") == 3]
    assert facts["server-2"] == exit_codes.STOPPED_NODES, (out[-3000:], b_round_3)
    summary = facts["summary-2"]
    assert summary["status"] == "stopped-early" and summary["stop-code"] in ("nodes", "deadline"), summary
    assert summary["resumable"] is True and summary["rounds"] == 2, summary
    assert facts["rounds-2"] == [0, 1, 2]  # round 3 was not recorded as done
    assert "start fedtune-server again to resume" in out
    assert facts["stopped-after-s"] < ROUND_TIMEOUT_S + STOP_GRACE_S + 40, facts  # at the deadline, with slack
    # ... and the next start resumes it to completion once the node is back
    assert facts["server-3"] == exit_codes.OK, (dep.root / "server-3.out").read_text()[-3000:]
    assert [r["round"] for r in dep.rounds_done()] == [0, 1, 2, 3]


def assert_no_node_charged_twice(dep: Deployment) -> dict[str, list[tuple[str, int]]]:
    """Every node's ledger charges each (run, round) at most once; the charges, per node."""
    charges = {name: dep.charges(name) for name in dep.nodes}
    for name, charged in charges.items():
        assert len(charged) == len(set(charged)), f"node {name} was charged twice for one training: {charged}"
    return charges


def test_no_node_is_charged_twice_for_one_training(restarted) -> None:  # noqa: ANN001
    dep, _ = restarted
    assert all(assert_no_node_charged_twice(dep).values())


def test_no_flower_process_outlives_its_daemon(restarted) -> None:  # noqa: ANN001
    dep, _ = restarted
    exited = {label: proc for label, proc in dep.procs.items() if proc.poll() is not None}  # type: ignore[attr-defined]
    assert {"server-1", "server-2", "server-3"} <= set(exited), sorted(exited)  # killed once, stopped, completed
    for label, proc in exited.items():
        assert session_pids(proc.pid) == [], label  # type: ignore[attr-defined]
    assert owned_pids(f"fedtune-server:{dep.srv.resolve()}") == []


@pytest.fixture(scope="module")
def exhausted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
              ) -> Iterator[tuple[Deployment, int]]:
    """Nodes whose budget (6) is below the run's epsilon (8) and who keep the federation's noise."""
    dep = Deployment(tmp_path_factory.mktemp("faults-budget"), rounds=4,
                     policy='max-epsilon = 6.0\ndelta = 1e-5\nnoise-plan = "as-requested"\ndataset-id = "notes"\n')
    dep.prepare(tiny_model_dir, sentiment_csv)
    try:
        server = dep.start_server("server")
        wait_until("run submitted", (dep.srv / "current-run.json").exists, 120, server)
        dep.start_node("a"), dep.start_node("b")
        yield dep, _wait_exit(server)
    finally:
        dep.stop_all()


def test_exhausted_budgets_stop_the_run_with_exit_3_and_a_refusal_in_the_ledger(exhausted) -> None:  # noqa: ANN001
    dep, code = exhausted
    assert code == exit_codes.STOPPED_BUDGET, (dep.root / "server.out").read_text()[-3000:]
    assert any(e["decision"] == "refused" for e in dep.ledger("a") + dep.ledger("b"))


def test_sigterm_to_fedtune_sim_leaves_no_flower_process_and_keeps_the_log(tmp_path: Path, tiny_model_dir: Path,
                                                                          sentiment_csv: Path) -> None:
    out = tmp_path / "run"
    cmd = [str(BIN / "fedtune-sim"), "--clients", "2", "--rounds", "30", "--model", str(tiny_model_dir),
           "--dataset", str(sentiment_csv), "--set", "partition-by=group", "--set", "max-seq-len=16",
           "--set", "batch-size=32", "--out", str(out)]
    sim = start(cmd, tmp_path / "sim.out")
    try:
        # The run writes into a hidden sibling of --out until it ends (sim/output.py).
        wait_until("round 1 started", lambda: any(p.read_text().strip() for p in
                                                  tmp_path.glob(".run.partial-*/metrics.jsonl")), 300, sim)
        sim.send_signal(signal.SIGTERM)  # the command only, as a service manager or `kill` would
        assert sim.wait(timeout=120) == exit_codes.TERMINATED, (tmp_path / "sim.out").read_text()[-3000:]
        assert session_pids(sim.pid) == [], "a Flower process of the killed run is still in its process group"
        assert owned_pids(f"fedtune-sim:{(out / 'flower').resolve()}") == []
        assert (out / "flower" / "run.log").stat().st_size > 0
    finally:
        kill_session(sim)
        kill_owned(f"fedtune-sim:{(out / 'flower').resolve()}")


def test_a_torn_ledger_fails_the_node_check(tmp_path: Path) -> None:
    import subprocess

    from fedtune.client.round import NodePrivacy  # noqa: F401 - the node's own ledger writer is importable
    from fedtune.common import tls
    from fedtune.common.ledger.key import load_or_create_key
    from fedtune.common.ledger.store import Ledger

    tls.create_ca(tmp_path / "ca")
    state = tmp_path / "state"
    key = load_or_create_key(state / "ledger-signing.key")
    witness = tmp_path / "state.witness.json"  # where fedtune-client looks for it by default
    with Ledger(state / "ledger.jsonl", key, witness=witness).session() as s:
        s.append({"run": "1", "round": 1, "dataset": "d", "fingerprint": "f", "decision": "refused", "reason": "x",
                  "event": None, "delta": 1e-5, "accountant": accountant_record("prv"), "epsilon": 0.0,
                  "epsilon_round": 0.0, "budget": 1.0, "request": {}})
    with open(state / "ledger.jsonl", "ab") as fh:
        fh.write(b'{"format":"fedtune-ledger/1","seq":2,"prev"')  # the process died mid-append
    make_sentiment_frame(40).to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "policy.toml").write_text("max-epsilon = 4.0\ndataset-id = \"notes\"\n")
    proc = subprocess.run([str(BIN / "fedtune-client"), "--check", "--superlink", f"127.0.0.1:{free_port()}",
                           "--root-certificates", str(tmp_path / "ca/ca.pem"), "--data", str(tmp_path / "data.csv"),
                           "--labels", "neg,pos",
                           "--policy", str(tmp_path / "policy.toml"), "--state-dir", str(state), "--allow-any-app"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == exit_codes.BAD_INPUT, proc.stdout + proc.stderr
    assert "line 2" in proc.stderr and "torn" in proc.stderr and "Traceback" not in proc.stderr


# -- secure aggregation (SecAgg+): a node dies inside the protocol -----------------------------------------------

SECAGG_TIMEOUT_S = 60  # each SecAgg+ stage waits this long for a node (a healthy stage takes ~15-40 s here)
SECURE_RUN_S = 900
SECURE_SETTINGS = f"secure-aggregation = true\nsecagg-timeout = {SECAGG_TIMEOUT_S}\nfraction-evaluate = 0.0\n"
# The daemon's watchdog must not stop the run while the protocol drops the dead node (fewer nodes online than
# min-clients for a while): the round itself ends, at the latest SECAGG_TIMEOUT_S after the node died.
SECURE_SERVER = ("--node-wait-timeout", "600", "--round-timeout", "900")
DROPPED_CODES = ("SECAGG_DROPPED", "FLOWER_NODE_UNAVAILABLE")  # no reply by the stage's timeout / node offline


def _clientapp_log(dep: Deployment, name: str) -> str:
    """The node's SuperNode log, with the output of its flwr-clientapp processes (the SecAgg+ mod's stages)."""
    path = dep.node_dir(name) / "state" / "supernode.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _secure_run(dep: Deployment, victim: str, kill_when: Any, facts: dict[str, Any]) -> None:
    """Start the server and every node, SIGKILL ``victim`` (its whole session) once ``kill_when()`` holds
    (polled), then follow the run to its end."""
    server = dep.start_server("server", *SECURE_SERVER)
    wait_until("run submitted", (dep.srv / "current-run.json").exists, 120, server)
    for name in dep.nodes:
        dep.start_node(name)
    wait_until(f"node {victim} inside the protocol", kill_when, SECURE_RUN_S, server, poll_s=0.05)
    dep.kill_node(victim)
    killed_at = time.monotonic()
    facts["victim-log"] = _clientapp_log(dep, victim)
    wait_until("round 1 recorded", lambda: len(dep.rounds_done()) >= 2, SECURE_RUN_S, server)
    facts["round-ended-after-kill-s"] = time.monotonic() - killed_at
    facts["server"] = _wait_exit(server, SECURE_RUN_S)
    print(f"\nsecure fault timings: {json.dumps({k: v for k, v in facts.items() if k.endswith('-s')})}")


@pytest.fixture(scope="module")
def secure_survivors(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
                     ) -> Iterator[tuple[Deployment, dict[str, Any]]]:
    """4 nodes, threshold round(0.75 x 4) = 3: node d dies right after its round-1 charge, in the masked-vector
    stage (it has 2,000 rows, so its DP-SGD outlasts the poll between its charge and its reply)."""
    dep = Deployment(tmp_path_factory.mktemp("faults-secagg-drop"), rounds=1, nodes="abcd", rows={"d": 2000},
                     settings=SECURE_SETTINGS + "secagg-threshold = 0.75\n").prepare(tiny_model_dir, sentiment_csv)
    facts: dict[str, Any] = {}
    try:
        _secure_run(dep, "d", lambda: dep.charged_in("d", 1), facts)
        yield dep, facts
    finally:
        dep.stop_all()


def test_a_node_killed_inside_secagg_is_dropped_and_the_survivors_complete_the_round(secure_survivors) -> None:  # noqa: ANN001
    dep, facts = secure_survivors
    assert "stage 2 completed" not in facts["victim-log"], "node d answered stage 2 before it was killed"
    assert facts["server"] == exit_codes.OK, (dep.root / "server.out").read_text()[-3000:]
    rows = dep.rounds_done()
    assert [r["round"] for r in rows] == [0, 1]
    summed = rows[1]["secure-aggregation"]
    assert summed["nodes"] == 4 and summed["threshold"] == 3, summed
    assert summed["aggregated"] is True and summed["in-sum"] == summed["trained"] == 3, summed
    statuses = sorted((c["status"], c.get("code") or "") for c in rows[1]["clients"])
    assert [s for s, _ in statuses] == ["error", "trained", "trained", "trained"], statuses
    assert statuses[0][1] in DROPPED_CODES, statuses
    assert facts["round-ended-after-kill-s"] < SECAGG_TIMEOUT_S + 120, facts
    run = str(json.loads((dep.srv / "current-run.json").read_text())["run-id"])
    charges = assert_no_node_charged_twice(dep)
    assert all(c == [(run, 1)] for c in charges.values()), charges  # d too: charged before it died, once


@pytest.fixture(scope="module")
def secure_below_threshold(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
                           ) -> Iterator[tuple[Deployment, dict[str, Any]]]:
    """3 nodes, threshold round(1.0 x 3) = 3: node c dies as its unmask stage starts (after its masked vector is
    in the sum), so its masks cannot be removed and the round has no aggregate."""
    dep = Deployment(tmp_path_factory.mktemp("faults-secagg-fail"), rounds=1, nodes="abc",
                     settings=SECURE_SETTINGS + "secagg-threshold = 1.0\n").prepare(tiny_model_dir, sentiment_csv)
    facts: dict[str, Any] = {}
    try:  # the gate acquires one task per SecAgg+ stage: the 4th of round 1 is the unmask stage
        _secure_run(dep, "c", lambda: dep.app_tasks("c") >= 4 and dep.charged_in("c", 1), facts)
        yield dep, facts
    finally:
        dep.stop_all()


def test_a_secure_round_below_the_threshold_fails_cleanly_and_the_run_ends(secure_below_threshold) -> None:  # noqa: ANN001
    dep, facts = secure_below_threshold
    assert "stage 2 completed" in facts["victim-log"] and "stage 3 completes" not in facts["victim-log"], \
        "node c was not killed between its masked vector and its key shares"
    out = (dep.root / "server.out").read_text()
    # The run completes its one round, but nothing was aggregated: exit 1, the adapter is the initial one.
    assert facts["server"] == exit_codes.FAILED, out[-3000:]
    assert "no node's update was aggregated" in out
    summary = json.loads((dep.srv / "results" / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    rows = dep.rounds_done()
    assert [r["round"] for r in rows] == [0, 1]
    summed = rows[1]["secure-aggregation"]
    assert summed["threshold"] == 3 and summed["aggregated"] is False and summed["why"], summed
    assert summed["in-sum"] == 3, summed  # c's masked vector arrived; its key shares never did
    assert facts["round-ended-after-kill-s"] < SECAGG_TIMEOUT_S + 90, facts  # the server did not hang
    run = str(json.loads((dep.srv / "current-run.json").read_text())["run-id"])
    charges = assert_no_node_charged_twice(dep)
    assert all(c == [(run, 1)] for c in charges.values()), charges
