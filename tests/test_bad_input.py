"""Every command fed nonsense: one short, literal error, the right exit code, nothing lost.

Each case runs a command (in process through its ``main``, a few as real
subprocesses), and asserts: the exit code; a short message naming the problem;
no traceback; and that the results directory and ledger written before are
byte-identical afterwards. Cases are data, so adding one is one line.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fedtune.common import exit_codes, tls
from fedtune.common.flower.processes import free_port
from fedtune.common.ledger.key import load_or_create_key
from fedtune.common.ledger.store import Ledger
from fedtune.common.privacy.accountant import accountant_record
from tests.tiny import make_sentiment_frame

BIN = Path(sys.executable).parent
LONG = "x" * 5000
MARKUP = "[bold red]boom[/]"
MAX_OUTPUT = 2500  # characters a message may take, whatever the input


@dataclass(frozen=True)
class World:
    """Valid inputs for every command, a finished run and a node's ledger (the things that must survive)."""

    root: Path

    def __getattr__(self, name: str) -> str:  # w.ca -> str path, for argv templates
        return str(self.root / PATHS[name])


PATHS = {
    "ca": "certs/ca/ca.pem", "ca_dir": "certs/ca", "cert": "certs/server/server.pem", "key": "certs/server/server.key",
    "other_cert": "other/server/server.pem", "other_key": "other/server/server.key",
    "loose_key": "loose/server.key", "node_keys": "certs/nodes", "node_key": "certs/nodes/a/node.key",
    "node_pub": "certs/nodes/a/node.pub", "loose_node_key": "loose/node.key",
    "ledger_pub": "certs/nodes/a/ledger-signing.pub",
    "data": "data.csv", "no_text": "no-text.csv", "empty": "empty.csv", "latin1": "latin1.csv", "binary": "binary.csv",
    "one_label": "one-label.csv", "policy": "policy.toml", "bad_policy": "bad-policy.toml", "allow": "allowed.txt",
    "bad_allow": "bad-allowed.txt", "garbage": "garbage.pem", "toml_bad": "bad.toml", "a_file": "a-file",
    "results": "protected/results", "state": "protected/state", "ledger": "protected/state/ledger.jsonl",
    "torn_state": "torn/state", "edited_state": "edited/state", "keyless_state": "keyless/state",
    "empty_dir": "empty-dir", "model": "model", "missing": "does-not-exist/file.csv",
}


def _ledger(state: Path) -> None:
    key = load_or_create_key(state / "ledger-signing.key")
    witness = state.parent / f"{state.name}.witness.json"  # where fedtune-client looks for it by default
    with Ledger(state / "ledger.jsonl", key, witness=witness).session() as session:
        for rnd in (1, 2):
            session.append({"run": "7", "round": rnd, "dataset": "d", "fingerprint": "f", "decision": "refused",
                            "reason": "test", "event": None, "delta": 1e-5, "accountant": accountant_record("prv"),
                            "epsilon": 0.0, "epsilon_round": 0.0, "budget": 1.0, "request": {}})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    tls.create_ca(root / "certs/ca")
    tls.create_server_cert(root / "certs/server", root / "certs/ca", ["localhost", "127.0.0.1"])
    tls.create_node_keys(root / "certs/nodes/a")
    tls.create_ca(root / "other/ca")
    tls.create_server_cert(root / "other/server", root / "other/ca", ["localhost", "127.0.0.1"])
    (root / "loose").mkdir()
    for src, dst in (("certs/server/server.key", "loose/server.key"), ("certs/nodes/a/node.key", "loose/node.key")):
        shutil.copy(root / src, root / dst)
        (root / dst).chmod(0o644)
    frame = make_sentiment_frame(80)
    frame.to_csv(root / "data.csv", index=False)
    frame.drop(columns=["text"]).to_csv(root / "no-text.csv", index=False)
    (root / "empty.csv").write_text("")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 good,pos\nbad,neg\n".encode("latin-1"))
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    frame.assign(label=[f"l{i}" for i in range(len(frame))]).to_csv(root / "one-label.csv", index=False)
    (root / "policy.toml").write_text("max-epsilon = 4.0\ndelta = 1e-5\ndataset-id = \"ward-7\"\n")
    (root / "bad-policy.toml").write_text("max-epsilon = -1\n")
    (root / "allowed.txt").write_text("ab" * 32 + "\n")
    (root / "bad-allowed.txt").write_text(f"not-a-hash {MARKUP}\n")
    (root / "garbage.pem").write_text(f"{MARKUP}\n{LONG}\n")
    (root / "bad.toml").write_text("num-rounds = = 3\n")
    (root / "a-file").write_text("not a directory\n")
    (root / "empty-dir").mkdir()
    results = root / "protected/results"
    results.mkdir(parents=True)
    (results / "summary.json").write_text('{"status": "completed", "rounds": 3, "final-accuracy": 0.75}\n')
    (results / "metrics.jsonl").write_text('{"round": 0, "accuracy": 0.5, "clients": []}\n')
    (results / "config.json").write_text('{"num-rounds": 3}\n')
    _ledger(root / "protected/state")
    for name in ("torn", "edited", "keyless"):
        shutil.copytree(root / "protected/state", root / name / "state")
    with open(root / "torn/state/ledger.jsonl", "ab") as fh:
        fh.write(b'{"format":"fedtune-ledger/1","seq":3,')
    edited = root / "edited/state/ledger.jsonl"
    edited.write_bytes(edited.read_bytes().replace(b'"reason":"test"', b'"reason":"TEST"', 1))
    (root / "keyless/state/ledger-signing.key").unlink()
    shutil.copytree(tiny_model_dir, root / "model")
    return World(root)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- the commands ------------------------------------------------------------------------------------------------

def _entry(name: str) -> Callable[[list[str]], int]:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name]
    return ep.load()


def _in_process(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = _entry(name)(argv)
    except SystemExit as stop:  # argparse
        code = stop.code if isinstance(stop.code, int) else 2
    out = capsys.readouterr()
    return int(code), out.out + out.err


def _subprocess(name: str, argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([str(BIN / name), *argv], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


SERVER_TLS = ["--ssl-ca-certfile", "{ca}", "--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}"]
SERVER_OK = [*SERVER_TLS, "--node-keys", "{node_keys}", "--set", "model-path={model}", "--set", "dataset={data}",
             "--set", "partition-by=group", "--metrics-address", "off", "--work-dir", "{work}"]
CLIENT_OK = ["--check", "--superlink", "127.0.0.1:{free}", "--root-certificates", "{ca}", "--node-key", "{node_key}",
             "--data", "{data}", "--labels", "neg,pos", "--policy", "{policy}", "--state-dir", "{state}",
             "--app-allowlist", "{allow}", "--metrics-address", "off"]
SIM_OK = ["--clients", "2", "--rounds", "1", "--model", "{model}", "--dataset", "{data}", "--set",
          "partition-by=group", "--out", "{work}/sim"]


def _replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag removed when ``value`` is None)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            if value is not None:
                out += [flag, value]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def server(*extra: str, drop: str = "", **replace: str) -> list[str]:
    argv = list(SERVER_OK)
    for flag in filter(None, drop.split()):
        argv = _replace(argv, flag, None)
    for flag, value in replace.items():
        argv = _replace(argv, "--" + flag.replace("_", "-"), value)
    return [*argv, *extra]


def client(*extra: str, drop: str = "", **replace: str) -> list[str]:
    argv = list(CLIENT_OK)
    for flag in filter(None, drop.split()):
        argv = _replace(argv, flag, None)
    for flag, value in replace.items():
        argv = _replace(argv, "--" + flag.replace("_", "-"), value)
    return [*argv, *extra]


def sim(*extra: str, **replace: str) -> list[str]:
    argv = list(SIM_OK)
    for flag, value in replace.items():
        argv = _replace(argv, "--" + flag.replace("_", "-"), value)
    return [*argv, *extra]


@dataclass(frozen=True)
class Case:
    command: str
    argv: list[str]
    code: int
    expect: str  # a piece of the message that names the problem
    subprocess: bool = False


B = exit_codes.BAD_INPUT
CASES: dict[str, Case] = {
    # fedtune-certs
    "certs-ca-exists": Case("fedtune-certs", ["ca", "--out", "{ca_dir}"], B, "already exists"),
    "certs-ca-out-is-a-file": Case("fedtune-certs", ["ca", "--out", "{a_file}/ca"], B, "a-file"),
    "certs-ca-days-zero": Case("fedtune-certs", ["ca", "--out", "{work}/ca", "--days", "0"], B, "--days must be"),
    "certs-server-no-ca": Case("fedtune-certs", ["server", "--ca", "{empty_dir}", "--out", "{work}/s", "--host", "h"],
                               B, "is missing"),
    "certs-server-host-space": Case("fedtune-certs", ["server", "--ca", "{ca_dir}", "--out", "{work}/s", "--host",
                                                      "a b"], B, "--host must be a hostname"),
    "certs-server-host-markup": Case("fedtune-certs", ["server", "--ca", "{ca_dir}", "--out", "{work}/s", "--host",
                                                       MARKUP], B, MARKUP),
    "certs-server-host-long": Case("fedtune-certs", ["server", "--ca", "{ca_dir}", "--out", "{work}/s", "--host",
                                                     f"a b{LONG}"], B, "more characters"),
    "certs-server-garbage-ca": Case("fedtune-certs", ["server", "--ca", "{garbage_ca}", "--out", "{work}/s",
                                                      "--host", "h"], B, "cannot read the CA"),
    "certs-node-exists": Case("fedtune-certs", ["node", "--out", "{node_keys}/a"], B, "already exists"),
    "certs-unknown-command": Case("fedtune-certs", ["nonsense"], B, "invalid choice"),
    "certs-subprocess-bad-host": Case("fedtune-certs", ["server", "--ca", "{ca_dir}", "--out", "{work}/s",
                                                        "--host", "a/b"], B, "--host must be", subprocess=True),
    # fedtune-server: every case fails before anything starts
    "server-no-tls": Case("fedtune-server", server(drop="--ssl-ca-certfile --ssl-certfile --ssl-keyfile"), B,
                          "are required"),
    "server-insecure-with-tls": Case("fedtune-server", server("--insecure"), B, "cannot be combined"),
    "server-loose-key": Case("fedtune-server", server(ssl_keyfile="{loose_key}"), B, "readable by other users"),
    "server-cert-other-ca": Case("fedtune-server", server(ssl_certfile="{other_cert}", ssl_keyfile="{other_key}"),
                                 B, "not issued by the CA"),
    "server-key-not-matching": Case("fedtune-server", server(ssl_keyfile="{other_key}"), B, "does not belong"),
    "server-garbage-ca": Case("fedtune-server", server(ssl_ca_certfile="{garbage}"), B, "not a PEM certificate"),
    "server-missing-cert": Case("fedtune-server", server(ssl_certfile="{missing}"), B, "does not exist"),
    "server-node-keys-empty": Case("fedtune-server", server(node_keys="{empty_dir}"), B, "holds no *.pub"),
    "server-node-key-garbage": Case("fedtune-server", server(node_keys="{garbage}"), B, "not an OpenSSH public key"),
    "server-set-no-equals": Case("fedtune-server", server("--set", "epsilon"), B, "--set expects KEY=VALUE"),
    "server-set-unknown": Case("fedtune-server", server("--set", "colour=blue"), B, "unknown setting 'colour'"),
    "server-set-negative-epsilon": Case("fedtune-server", server("--set", "epsilon=-1"), B, "epsilon"),
    "server-set-markup": Case("fedtune-server", server("--set", f"seed={MARKUP}"), B, MARKUP),
    "server-run-config-not-toml": Case("fedtune-server", server("--run-config", "{toml_bad}"), B, "not valid TOML"),
    "server-run-config-missing": Case("fedtune-server", server("--run-config", "{missing}"), B, "cannot be read"),
    "server-port-range": Case("fedtune-server", server("--port", "70000"), B, "between 1 and 65535"),
    "server-port-not-a-number": Case("fedtune-server", server("--port", "abc"), B, "invalid int value"),
    "server-port-in-use": Case("fedtune-server", server("--port", "{busy}"), B, "already in use"),
    "server-host-unresolvable": Case("fedtune-server", server("--host", "no-such-host.invalid"), B,
                                     "cannot be resolved"),
    "server-completed-results": Case("fedtune-server", server("--set", "results-dir={results}"), B,
                                     "holds a completed run"),
    "server-work-dir-is-a-file": Case("fedtune-server", server(work_dir="{a_file}"), B, "not a directory"),
    "server-results-dir-is-a-file": Case("fedtune-server", server("--set", "results-dir={a_file}"), B,
                                         "not a directory"),
    "server-results-contain-work-dir": Case("fedtune-server", server("--set", "results-dir={work}"), B,
                                            "must not contain --work-dir"),
    "server-timeout-zero": Case("fedtune-server", server("--round-timeout", "0"), B, "must be > 0"),
    "server-metrics-address": Case("fedtune-server", server(metrics_address="nonsense"), B, "expected HOST:PORT"),
    "server-dataset-missing": Case("fedtune-server", server("--set", "dataset={missing}"), B, "does not exist"),
    "server-model-missing": Case("fedtune-server", server("--set", "model-path={work}/none"), B, "not a directory"),
    "server-subprocess-no-args": Case("fedtune-server", ["--work-dir", "{work}"], B, "are required",
                                      subprocess=True),
    # fedtune-client --check
    "client-no-port": Case("fedtune-client", client(superlink="127.0.0.1"), B, "must be HOST:PORT"),
    "client-bad-port": Case("fedtune-client", client(superlink="127.0.0.1:99999"), B, "between 1 and 65535"),
    "client-unresolvable": Case("fedtune-client", client(superlink="no-such-host.invalid:443"), B,
                                "cannot be resolved"),
    "client-insecure-with-key": Case("fedtune-client", client("--insecure"), B, "node authentication requires TLS"),
    "client-no-ca": Case("fedtune-client", client(drop="--root-certificates"), B, "--root-certificates is required"),
    "client-loose-key": Case("fedtune-client", client(node_key="{loose_node_key}"), B, "readable by other users"),
    "client-key-garbage": Case("fedtune-client", client(node_key="{garbage}"), B, "not an unencrypted OpenSSH"),
    "client-ca-garbage": Case("fedtune-client", client(root_certificates="{garbage}"), B, "not a PEM certificate"),
    "client-data-missing": Case("fedtune-client", client(data="{missing}"), B, "does not exist"),
    "client-data-no-text": Case("fedtune-client", client(data="{no_text}"), B, "column 'text'"),
    "client-data-empty": Case("fedtune-client", client(data="{empty}"), B, "is empty"),
    "client-data-latin1": Case("fedtune-client", client(data="{latin1}"), B, "UTF-8"),
    "client-data-binary": Case("fedtune-client", client(data="{binary}"), B, "binary.csv"),
    "client-no-labels": Case("fedtune-client", client(drop="--labels"), B, "--labels is required"),
    "client-undeclared-label": Case("fedtune-client", client(labels="neg,other"), B, "label 'pos', not one of"),
    "client-policy-missing": Case("fedtune-client", client(policy="{missing}"), B, "does not exist"),
    "client-policy-invalid": Case("fedtune-client", client(policy="{bad_policy}"), B, "max-epsilon must be > 0"),
    "client-allowlist-bad": Case("fedtune-client", client(app_allowlist="{bad_allow}"), B, MARKUP),
    "client-no-allowlist": Case("fedtune-client", client(drop="--app-allowlist"), B, "--app-allowlist FILE"),
    "client-torn-ledger": Case("fedtune-client", client(state_dir="{torn_state}"), B, "torn"),
    "client-edited-ledger": Case("fedtune-client", client(state_dir="{edited_state}"), B, "line 1"),
    "client-ledger-without-key": Case("fedtune-client", client(state_dir="{keyless_state}"), B, "signing key"),
    "client-state-dir-is-a-file": Case("fedtune-client", client(state_dir="{a_file}"), B, "not writable"),
    "client-max-restarts": Case("fedtune-client", client("--max-restarts", "-1"), B, "--max-restarts must be"),
    "client-stall-timeout": Case("fedtune-client", client("--stall-timeout", "0"), B, "--stall-timeout must be"),
    "client-metrics-address": Case("fedtune-client", client(metrics_address="x"), B, "expected HOST:PORT"),
    "client-server-from-other-ca": Case("fedtune-client", client(superlink="127.0.0.1:{tls_port}"), B,
                                        "does not verify"),
    "client-superlink-long": Case("fedtune-client", client(superlink=LONG), B, "more characters"),
    "client-subprocess-no-port": Case("fedtune-client", client(superlink="localhost"), B, "must be HOST:PORT",
                                      subprocess=True),
    # fedtune-audit (the command line; malformed ledgers have their own table)
    "audit-missing-ledger": Case("fedtune-audit", ["{missing}", "--public-key", "{ledger_pub}"], B,
                                 "does not exist"),
    "audit-dir-without-ledger": Case("fedtune-audit", ["{empty_dir}", "--public-key", "{ledger_pub}"], B,
                                     "does not exist"),
    "audit-key-missing": Case("fedtune-audit", ["{ledger}", "--public-key", "{missing}"], B, "cannot be read"),
    "audit-key-not-a-key": Case("fedtune-audit", ["{ledger}", "--public-key", "{garbage}"], B,
                                "not a PEM public key"),
    "audit-key-is-a-directory": Case("fedtune-audit", ["{ledger}", "--public-key", "{empty_dir}"], B,
                                     "cannot be read"),
    "audit-subprocess-missing": Case("fedtune-audit", ["{missing}", "--public-key", "{ledger_pub}"], B,
                                     "does not exist", subprocess=True),
    # fedtune-sim
    "sim-clients-zero": Case("fedtune-sim", sim(clients="0"), B, "--clients must be >= 1"),
    "sim-dataset-missing": Case("fedtune-sim", sim(dataset="{missing}"), B, "does not exist"),
    "sim-dataset-no-text": Case("fedtune-sim", sim(dataset="{no_text}"), B, "column 'text'"),
    "sim-dataset-latin1": Case("fedtune-sim", sim(dataset="{latin1}"), B, "UTF-8"),
    "sim-set-no-equals": Case("fedtune-sim", sim("--set", "epsilon"), B, "--set expects KEY=VALUE"),
    "sim-set-unknown": Case("fedtune-sim", sim("--set", "colour=blue"), B, "unknown setting 'colour'"),
    "sim-epsilon-negative": Case("fedtune-sim", sim("--epsilon", "-1"), B, "epsilon"),
    "sim-lora-rank-zero": Case("fedtune-sim", sim("--lora-rank", "0"), B, "rank"),
    "sim-lora-targets-absent": Case("fedtune-sim", sim("--set", "lora-targets=q,v"), B,
                                    "linear modules are named dense, key, query, value"),
    "sim-model-missing": Case("fedtune-sim", sim(model="{work}/none"), B, "none"),
    "sim-set-markup": Case("fedtune-sim", sim("--set", f"seed={MARKUP}"), B, MARKUP),
    "sim-out-completed-run": Case("fedtune-sim", sim(out="{results}"), B, "results"),
    "sim-out-is-a-file": Case("fedtune-sim", sim(out="{a_file}"), B, "a-file"),
}
@pytest.fixture(scope="module")
def other_ca_server(world: World) -> Iterator[int]:
    """A TLS server whose certificate comes from another CA (what a node must refuse before starting)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(world.other_cert, world.other_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_input_gets_one_short_error_and_loses_nothing(name: str, world: World, other_ca_server: int,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          request: pytest.FixtureRequest) -> None:
    case = CASES[name]
    values = {k: str(world.root / v) for k, v in PATHS.items()} | {
        "work": str(tmp_path), "free": str(free_port()), "tls_port": str(other_ca_server),
        "garbage_ca": str(tmp_path / "garbage-ca")}
    (tmp_path / "garbage-ca").mkdir()
    (tmp_path / "garbage-ca" / "ca.pem").write_text(MARKUP)
    (tmp_path / "garbage-ca" / "ca.key").write_text(MARKUP)
    busy = socket.create_server(("127.0.0.1", 0))
    values["busy"] = str(busy.getsockname()[1])
    argv = [a.format(**values) for a in case.argv]
    before = _snapshot(world.root / "protected")
    assert {"results/summary.json", "state/ledger.jsonl"} <= before.keys(), before  # something to protect
    try:
        code, output = (_subprocess(case.command, argv) if case.subprocess
                        else _in_process(case.command, argv, capsys))
    finally:
        busy.close()
    assert "Traceback" not in output, output[-3000:]
    assert code == case.code, output[-3000:]
    assert " ".join(case.expect.split()) in " ".join(output.split()), output[-3000:]  # rich wraps long lines
    assert len(output) <= MAX_OUTPUT, f"{len(output)} characters of output"
    assert _snapshot(world.root / "protected") == before, "a result or ledger written before was changed"


def test_there_are_at_least_sixty_cases_across_all_five_commands() -> None:
    assert len(CASES) >= 60
    assert {c.command for c in CASES.values()} == {"fedtune-sim", "fedtune-server", "fedtune-client",
                                                    "fedtune-certs", "fedtune-audit"}
