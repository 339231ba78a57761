"""A real deployment on loopback: fedtune-server + fedtune-client daemons, TLS, node auth, app pinning.

The default suite runs the small scenario (``small``): a TLS server with two authenticated nodes
runs one DP round while a plaintext node tries to join and is refused; both ledgers verify.

The full scenario (``scenario``, marked slow, ~2.5 min on 2 cores alone) covers the rest:
nodes a and b (registered, app allow-listed) and c (registered, allow-list
without the run's app) join a 2-round DP fine-tuning of a tiny BERT. While round
1 runs, a plaintext node and a node with an unregistered key try to join and
are refused, and a local process holding only the CA certificate tries to
register a node key through the control API and is refused (only fedtune-server
holds the operator token). Right after the round-1 checkpoint the whole server process group
is SIGKILLed; a restarted fedtune-server resumes from the checkpoint and
finishes. Every process is started in its own session and killed by process
group in teardown; Flower gets a private FLWR_HOME per process and free ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedtune.common import exit_codes
from fedtune.common.flower.processes import free_port
from fedtune.common.ledger.entry import ACCOUNTING_KINDS
from tests.tiny import make_sentiment_frame

BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 300


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Scenario:
    root: Path
    server_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    first_run_id: int | None = None
    intruder: dict[str, object] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def srv(self) -> Path:
        return self.root / "srv"

    def node_dir(self, name: str) -> Path:
        return self.root / f"node-{name}"

    nodes: str = "abc"  # the registered nodes that join the run

    def server_cmd(self) -> list[str]:
        c = self.certs
        keys = [arg for n in self.nodes for arg in ("--node-keys", str(c / "nodes" / n / "node.pub"))]
        return [str(BIN / "fedtune-server"), "--ssl-ca-certfile", str(c / "ca/ca.pem"),
                "--ssl-certfile", str(c / "server/server.pem"), "--ssl-keyfile", str(c / "server/server.key"),
                *keys, "--run-config", str(self.root / "run.toml"), "--work-dir", str(self.srv),
                "--port", str(self.server_port), "--metrics-address", "off"]

    def client_cmd(self, name: str, *, allowlist: Path, key: str | None = None, insecure: bool = False,
                   max_restarts: int = 0) -> list[str]:
        d = self.node_dir(name)
        cmd = [str(BIN / "fedtune-client"), "--superlink", f"127.0.0.1:{self.server_port}",
               "--data", str(d / "data.csv"), "--labels", "neg,pos", "--state-dir", str(d / "state"),
               "--policy", str(d / "policy.toml"), "--app-allowlist", str(allowlist),
               "--runtime-port", str(free_port()), "--max-restarts", str(max_restarts), "--metrics-address", "off"]
        if insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.certs / "ca/ca.pem")]
        if key:
            cmd += ["--node-key", str(self.certs / "nodes" / key / "node.key")]
        return cmd


def _prepare(root: Path, model_dir: Path, dataset: Path, *, nodes: str = "abc", rounds: int = 2) -> Scenario:
    sc = Scenario(root, free_port(), nodes=nodes)
    subprocess.run([str(BIN / "fedtune-certs"), "dev", "--out", str(sc.certs), "--host", "localhost",
                    "--host", "127.0.0.1", *[a for n in "abcd" for a in ("--node", n)]], check=True,
                   capture_output=True)
    frame = make_sentiment_frame(600, seed=1)
    for i, name in enumerate("abcdp"):
        d = sc.node_dir(name)
        d.mkdir()
        frame.iloc[i * 100:(i + 1) * 100 + 50].to_csv(d / "data.csv", index=False)
        key = sc.certs / "nodes" / (name if name in "abcd" else "a") / "ledger-signing.key"
        (d / "policy.toml").write_text(f'max-epsilon = 8.0\ndelta = 1e-5\ndataset-id = "node-{name}"\n'
                                       f'ledger-key = "{key}"\n')
    (root / "run.toml").write_text(
        f'model-path = "{model_dir}"\ndataset = "{dataset}"\npartition-by = "group"\nmax-seq-len = 16\n'
        f"batch-size = 32\nlearning-rate = 0.05\nnum-rounds = {rounds}\nmin-clients = {len(nodes)}\n")
    app_hash = subprocess.run([str(BIN / "fedtune-server"), "--work-dir", str(sc.srv), "--print-app-hash"],
                              check=True, capture_output=True, text=True).stdout.strip()
    (root / "allowed.txt").write_text(f"# fedtune app bundle\n{app_hash}\n")
    (root / "other-app.txt").write_text("0" * 64 + "\n")
    return sc


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fedtune-server exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s:.0f}s")
        time.sleep(0.1)


def _refusals(sc: Scenario, labels: tuple[str, ...]) -> None:
    """Nodes the server must refuse, tried (in parallel) while round 1 runs."""
    allowed = sc.root / "allowed.txt"
    commands = {
        "plaintext": lambda: sc.client_cmd("p", allowlist=allowed, insecure=True, max_restarts=1),
        "unregistered": lambda: sc.client_cmd("d", allowlist=allowed, key="d", max_restarts=1),
    }
    attempts = {label: commands[label]() for label in labels}
    procs = {label: _start([*cmd, "--connect-retries", "2"], sc.root / f"{label}.out")
             for label, cmd in attempts.items()}
    sc.procs += procs.values()
    for label, proc in procs.items():
        try:
            sc.exit_codes[label] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            sc.exit_codes[label] = -1


def _intrude(sc: Scenario) -> None:
    """A local process with only the CA certificate tries the control API: flwr CLI and a raw request."""
    import httpx

    from fedtune.common.flower.control import FlwrCli, write_connection
    from fedtune.common.flower.processes import flower_env

    home = sc.root / "intruder-home"
    write_connection(home, f"127.0.0.1:{sc.server_port}", root_certificates=sc.certs / "ca/ca.pem")
    cli = FlwrCli(flower_env(home), sc.root)
    sc.intruder["register"] = cli.json("supernode", "register", str(sc.certs / "nodes" / "d" / "node.pub"), "fedtune")
    sc.intruder["list"] = cli.json("supernode", "list", "fedtune")
    reply = httpx.post(f"https://127.0.0.1:{sc.server_port}/v1/control/register-node", content=b"",
                       verify=str(sc.certs / "ca/ca.pem"), timeout=10,
                       headers={"content-type": "application/protobuf"})
    sc.intruder["raw-status"] = reply.status_code


def _run(sc: Scenario) -> None:
    server = _start(sc.server_cmd(), sc.root / "server-1.out")
    sc.procs.append(server)
    _wait_for(sc.srv / "current-run.json", server, 120)  # SuperLink up, nodes registered, run submitted
    allowed, other = sc.root / "allowed.txt", sc.root / "other-app.txt"
    for name, allowlist in (("a", allowed), ("b", allowed), ("c", other)):
        sc.procs.append(_start(sc.client_cmd(name, allowlist=allowlist, key=name), sc.root / f"client-{name}.out"))
    _refusals(sc, ("unregistered",))
    _intrude(sc)
    _wait_for(sc.srv / "checkpoints" / "round-0001", server, RUN_TIMEOUT_S)
    _kill_group(server)  # a crash of the whole server (SuperLink, ServerApp) right after round 1
    sc.exit_codes["killed-server"] = server.returncode
    sc.first_run_id = json.loads((sc.srv / "current-run.json").read_text())["run-id"]
    restarted = _start(sc.server_cmd(), sc.root / "server-2.out")
    sc.procs.append(restarted)
    try:
        sc.exit_codes["server"] = restarted.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sc.exit_codes["server"] = -1


def _run_small(sc: Scenario) -> None:
    server = _start(sc.server_cmd(), sc.root / "server-1.out")
    sc.procs.append(server)
    _wait_for(sc.srv / "current-run.json", server, 120)
    for name in sc.nodes:
        sc.procs.append(_start(sc.client_cmd(name, allowlist=sc.root / "allowed.txt", key=name),
                               sc.root / f"client-{name}.out"))
    _refusals(sc, ("plaintext",))
    try:
        sc.exit_codes["server"] = server.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sc.exit_codes["server"] = -1
    sc.first_run_id = json.loads((sc.srv / "current-run.json").read_text())["run-id"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path) -> Iterator[Scenario]:
    sc = _prepare(tmp_path_factory.mktemp("deploy-small"), tiny_model_dir, sentiment_csv, nodes="ab", rounds=1)
    try:
        _run_small(sc)
        yield sc
    finally:
        for proc in reversed(sc.procs):
            _kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sentiment_csv: Path
             ) -> Iterator[Scenario]:
    sc = _prepare(tmp_path_factory.mktemp("deploy"), tiny_model_dir, sentiment_csv)
    try:
        _run(sc)
        yield sc
    finally:
        for proc in reversed(sc.procs):
            _kill_group(proc, signal.SIGTERM)


def _metrics(sc: Scenario) -> list[dict]:
    return [json.loads(line) for line in (sc.srv / "results" / "metrics.jsonl").read_text().splitlines()]


def _ledger(sc: Scenario, name: str) -> list[dict]:
    path = sc.node_dir(name) / "state" / "ledger.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["kind"] in ACCOUNTING_KINDS]  # no header/policy entries


def _audit_ledgers(sc: Scenario, names: str) -> dict[str, list[tuple[str, int]]]:
    """Each node's ledger verifies against its policy and key; its charged (run, round) pairs."""
    from cryptography.hazmat.primitives import serialization

    from fedtune.audit.ledger_audit import LedgerSpec, audit_ledger
    from fedtune.audit.policy import read_policy
    from fedtune.common.ledger.key import key_id

    charged = {}
    for name in names:
        pub = serialization.load_pem_public_key((sc.certs / "nodes" / name / "ledger-signing.pub").read_bytes())
        spec = LedgerSpec(sc.node_dir(name) / "state" / "ledger.jsonl",
                          policy=read_policy(sc.node_dir(name) / "policy.toml"))
        report = audit_ledger(spec, {key_id(pub): pub})
        assert report.ok, [str(p) for p in report.problems.listed()]
        charged[name] = [(str(e["run"]), int(e["round"])) for e in _ledger(sc, name) if e["decision"] == "charged"]
    return charged


def test_small_tls_deployment_trains_a_round_and_both_ledgers_verify(small: Scenario) -> None:
    out = (small.root / "server-1.out").read_text()
    assert small.exit_codes["server"] == 0, out[-3000:]
    rows = _metrics(small)
    assert [r["round"] for r in rows] == [0, 1]
    assert sorted(c["status"] for c in rows[1]["clients"]) == ["trained", "trained"], rows[1]["clients"]
    assert 0 < rows[1]["epsilon-max"] <= 8.0
    for name, charged in _audit_ledgers(small, "ab").items():
        assert charged == [(str(small.first_run_id), 1)], f"node {name}: {charged}"


def test_plaintext_node_is_refused(small: Scenario) -> None:
    out = (small.root / "plaintext.out").read_text()
    assert small.exit_codes["plaintext"] == exit_codes.BAD_INPUT, out[-2000:]
    assert "refused a plaintext connection: the server requires TLS" in out


@pytest.mark.slow
def test_server_resumes_after_a_crash_and_the_run_completes(scenario: Scenario) -> None:
    out = (scenario.root / "server-2.out").read_text()
    assert scenario.exit_codes["server"] == 0, out[-3000:]
    summary = json.loads((scenario.srv / "results" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["resumed-after-round"] == 1
    rows = _metrics(scenario)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:  # a and b trained every round; c's refusals are errors, not updates
        assert sorted(c["status"] for c in r["clients"]) == ["error", "trained", "trained"], r["clients"]
        assert r["epsilon-max"] is not None and 0 < r["epsilon-max"] <= 8.0
    assert (scenario.srv / "results" / "adapter").is_dir()


@pytest.mark.slow
def test_ledgers_verify_and_every_training_is_charged_once(scenario: Scenario) -> None:
    final_run = json.loads((scenario.srv / "current-run.json").read_text())["run-id"]
    for name, charged in _audit_ledgers(scenario, "ab").items():
        assert len(charged) == len(set(charged)), f"node {name} charged one training twice: {charged}"
        assert (str(scenario.first_run_id), 1) in charged and (str(final_run), 2) in charged
        # Round 2 of the killed attempt counts only if that node really trained it before the crash.
        trained = (scenario.node_dir(name) / "state" / "supernode.log").read_text().count(
            "Sending: train message")
        assert len(charged) == trained, f"node {name}: {len(charged)} charges for {trained} trainings"


@pytest.mark.slow
def test_node_without_the_app_on_its_allow_list_refuses_it_and_trains_nothing(scenario: Scenario) -> None:
    decisions = [json.loads(x) for x in (scenario.node_dir("c") / "state" / "app-decisions.jsonl").read_text()
                 .splitlines()]
    assert decisions and all(d["decision"] == "refused" for d in decisions)
    assert "not on this node's allow-list" in decisions[0]["reason"]
    assert not any(e["decision"] == "charged" for e in _ledger(scenario, "c"))
    codes = [c["code"] for r in _metrics(scenario)[1:] for c in r["clients"] if c["status"] == "error"]
    assert codes and all(code == "FLOWER_INVALID_FAB" for code in codes)  # a code, never the node's text
    allowed = [json.loads(x) for x in (scenario.node_dir("a") / "state" / "app-decisions.jsonl").read_text()
               .splitlines()]
    assert allowed and all(d["decision"] == "allowed" for d in allowed)


@pytest.mark.slow
def test_unregistered_node_key_is_refused(scenario: Scenario) -> None:
    out = (scenario.root / "unregistered.out").read_text()
    assert scenario.exit_codes["unregistered"] == exit_codes.BAD_INPUT, out[-2000:]
    assert "not registered" in out and "node.pub" in out
    assert not (scenario.node_dir("d") / "state" / "ledger.jsonl").exists()


@pytest.mark.slow
def test_a_local_process_with_only_the_ca_cannot_register_a_node_key(scenario: Scenario) -> None:
    register, listing = scenario.intruder["register"], scenario.intruder["list"]
    assert isinstance(register, dict) and register.get("success") is not True, register
    assert "Authentication failed" in str(register.get("error-message")), register
    assert isinstance(listing, dict) and listing.get("success") is not True, listing
    assert scenario.intruder["raw-status"] == 401
    assert (scenario.srv / "control.token").stat().st_mode & 0o077 == 0  # the operator credential is private
