"""Everything fedtune-client checks before it connects, with every problem reported at once.

A hospital operator should learn about a wrong CA path, a key with loose
permissions, a data file missing its label column, a malformed policy and a
read-only ledger directory from one run, not five.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.client.gate import read_allowlist
from fedtune.client.policy import load_policy
from fedtune.common import tls
from fedtune.common.errors import ConfigError, FedtuneError, quote
from fedtune.common.ledger.key import KEY_FILE, load_or_create_key, private_key_identity, public_identity
from fedtune.common.ledger.store import LEDGER_FILE, Ledger
from fedtune.common.tasks import DEFAULT_TASK, get_task


@dataclass(frozen=True)
class NodeOptions:
    """How this node connects, what it trains on and where it keeps its state."""

    superlink: str  # host:port of the federation's fleet API (the reverse proxy in production)
    data: Path  # the node's private examples (CSV / JSONL / Parquet)
    state_dir: Path  # privacy state and ledger; back this up
    root_certificates: Path | None = None  # CA that signed the server certificate (TLS)
    node_key: Path | None = None  # OpenSSH EC private key registered with the server (node authentication)
    insecure: bool = False  # plaintext transport; only for local tests, never with node authentication
    policy: Path | None = None  # the node's privacy policy (TOML, required); it wins over the server's request
    allowlist: Path | None = None  # sha256 digests of app bundles this node will run
    allow_any_app: bool = False  # explicit opt-out of app pinning
    text_column: str = "text"  # the column the federation's runs read text from
    label_column: str = "label"  # the column holding labels
    task: str = DEFAULT_TASK  # the task this node trains: a request for another one is refused
    labels: tuple[str, ...] = ()  # the declared label (or tag) set: a request naming others is refused
    log_file: Path | None = None  # default: STATE_DIR/fedtune-client.log
    runtime_port: int = 9094  # node-local Runtime API port (distinct per node on one host)
    max_restarts: int = 0  # restarts of a failed SuperNode before giving up (0 = forever)
    connect_retries: int = 8  # SuperNode's own retries per connection attempt before the daemon takes over
    stall_timeout_s: float = 120.0  # SuperNode failing to connect and silent this long: restart it
    witness: Path | None = None  # the ledger's witness (default: beside STATE_DIR, outside it)
    prewarm: bool = True  # the app gate keeps the next ClientApp process started, imports done

    @property
    def log_path(self) -> Path:
        return self.log_file or self.state_dir / "fedtune-client.log"

    @property
    def flower_log_path(self) -> Path:
        """Flower's own output (SuperNode, app gate, ClientApp), apart from the daemon's one-line events."""
        return self.log_path.with_name("supernode.log")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE

    @property
    def witness_path(self) -> Path:
        """Kept outside the state directory, so restoring that directory from an old backup is detected."""
        return self.witness or self.state_dir.parent / f"{self.state_dir.name}.witness.json"

    def ledger_key_path(self) -> Path:
        """The ledger's signing key: the policy's ``ledger-key``, else ``STATE_DIR/ledger-signing.key``."""
        if self.policy is not None and self.policy.is_file() and (named := load_policy(self.policy).ledger_key):
            return Path(named)
        return self.state_dir / KEY_FILE

    def identity(self) -> str:
        """The node identity its ledger header names: its authentication key, else (``--insecure`` test nodes)
        its ledger key, created here if the node has none yet."""
        if self.node_key is not None:
            return private_key_identity(self.node_key)
        return public_identity(load_or_create_key(self.ledger_key_path()).public_key())

    @property
    def node_config(self) -> str:
        """``--node-config`` for flower-supernode: the ClientApp's node settings (all the node's own)."""
        pairs: dict[str, object] = {
            "data-path": self.data.resolve(), "state-dir": self.state_dir.resolve(),
            "witness": self.witness_path.resolve(), "text-column": self.text_column,
            "label-column": self.label_column, "task": self.task, "node": self.identity()}
        if self.policy is not None:
            pairs["policy"] = self.policy.resolve()
        for key, value in pairs.items():
            if '"' in str(value) or "'" in str(value) or " " in str(value):
                raise ConfigError(f"{key} {quote(value)} contains quotes or spaces; use a plain path or column name")
        if bad := [x for x in self.labels if "'" in x or not x.isprintable()]:
            raise ConfigError(f"label {quote(bad[0])} contains a quote or a control character")
        labels = json.dumps(list(self.labels))  # a TOML literal string: label names may hold spaces
        return " ".join(f'{k}="{v}"' for k, v in pairs.items()) + f" labels='{labels}'"


def _transport_problems(opts: NodeOptions) -> list[str]:
    if opts.insecure:
        if opts.node_key is not None:
            return ["--insecure cannot be combined with --node-key: node authentication requires TLS "
                    "(drop --insecure and pass --root-certificates)"]
        return []
    if opts.root_certificates is None:
        return ["--root-certificates is required: connections use TLS (pass --insecure explicitly only for a "
                "plaintext test federation)"]
    return tls.check_ca_file(opts.root_certificates)


def address_problems(address: str) -> list[str]:
    """``host:port`` with a port in range and a host that resolves."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        return [f"--superlink must be HOST:PORT (e.g. fl.example.org:443), got {quote(address)}"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return [f"--superlink {quote(address)}: the port must be a number between 1 and 65535"]
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return [f"--superlink host {quote(host)} cannot be resolved ({getattr(err, 'strerror', None) or err}): "
                f"check the name and this machine's DNS"]
    return []


def _ledger_problems(opts: NodeOptions) -> list[str]:
    """An existing ledger must verify with the node's key: the node will not train on a damaged one."""
    if not opts.ledger_path.exists():
        return []
    key_path = opts.state_dir / KEY_FILE
    if opts.policy is not None and opts.policy.is_file():
        try:
            named = load_policy(opts.policy).ledger_key
        except FedtuneError:
            return []  # reported with the policy
        key_path = Path(named) if named else key_path
    if not key_path.is_file():
        return [f"ledger {opts.ledger_path} exists but its signing key {key_path} does not: restore the key from "
                f"backup (a new key cannot continue this ledger)"]
    try:
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        return []  # reported with the key
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        return []
    try:
        Ledger(opts.ledger_path, loaded, witness=opts.witness_path).entries()
    except FedtuneError as err:
        return list(err.problems)
    except OSError as err:
        return [f"ledger {opts.ledger_path} cannot be read: {err.strerror or err}"]
    return []


def _data_problems(opts: NodeOptions) -> list[str]:
    """The data file read as the node's rounds will read it, but strictly: every bad row is a problem here (a
    round leaves such rows out and logs them)."""
    task = get_task(opts.task)
    if task.labelled and len(opts.labels) < 2:
        return [f"--labels is required for task {task.name}: declare the label set of your data (e.g. --labels "
                "neg,pos); the node refuses requests naming other labels"]
    try:
        task.read_file(opts.data, text_column=opts.text_column, label_column=opts.label_column, labels=opts.labels)
    except FedtuneError as err:
        return list(err.problems)
    return []


def _policy_problems(policy: Path) -> list[str]:
    if not policy.is_file():
        return [f"policy file {policy} does not exist"]
    try:
        loaded = load_policy(policy)
    except FedtuneError as err:
        return list(err.problems)
    return _ledger_key_problems(Path(loaded.ledger_key), policy) if loaded.ledger_key else []


def _ledger_key_problems(key: Path, policy: Path) -> list[str]:
    """A ledger key named by the policy must exist: the node must not mint a new identity on its own."""
    if not key.is_file():
        return [f"ledger-key {key} (set in {policy}) does not exist; create it with `fedtune-certs node`"]
    try:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        return [f"ledger-key {key} (set in {policy}) is not an unencrypted PEM private key: {err}"]
    out = [] if isinstance(loaded, ed25519.Ed25519PrivateKey) else [
        f"ledger-key {key} (set in {policy}) must be an Ed25519 key, got {type(loaded).__name__}"]
    if key.stat().st_mode & 0o077:
        out.append(f"ledger-key {key} is readable by other users; run chmod 600 {key}")
    return out


def _writable_dir(path: Path, what: str) -> list[str]:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return [f"{what} {path} is not writable: {err.strerror}"]
    return []


def problems(opts: NodeOptions) -> list[str]:
    """Every problem with the node's setup; empty when it may connect."""
    out = address_problems(opts.superlink) + _transport_problems(opts)
    if opts.node_key is not None:
        out += tls.check_node_key(opts.node_key)
    out += _data_problems(opts)
    if opts.policy is None:
        out.append("--policy FILE is required: the node's own privacy policy (max epsilon, delta, ...) decides "
                   "what it trains; the server's request is never the budget")
    else:
        out += _policy_problems(opts.policy)
    out += _writable_dir(opts.state_dir, "state directory (privacy ledger)")
    out += _writable_dir(opts.log_path.parent, "log directory")
    out += _ledger_problems(opts)
    if opts.allowlist is not None:
        try:
            read_allowlist(opts.allowlist)
        except ConfigError as err:
            out += err.problems
    elif not opts.allow_any_app:
        out.append("--app-allowlist FILE is required (sha256 of the app bundles this node may run; the operator "
                   "publishes it, `fedtune-server --print-app-hash` prints it); or pass --allow-any-app explicitly")
    if opts.max_restarts < 0:
        out.append(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.connect_retries < 1:
        out.append(f"--connect-retries must be >= 1, got {opts.connect_retries}")
    if not opts.stall_timeout_s > 0:
        out.append(f"--stall-timeout must be > 0 seconds, got {opts.stall_timeout_s}")
    return out


def check(opts: NodeOptions) -> str | None:
    """Raise ConfigError listing every problem; then, with TLS, verify the server's certificate if it answers.

    Returns a note when the server cannot be reached now (the node keeps trying; not a problem).
    """
    if found := problems(opts):
        raise ConfigError(found)
    if opts.insecure or opts.root_certificates is None:
        return None
    reached, why = tls.probe_server(opts.superlink, opts.root_certificates)
    if reached and why:
        raise ConfigError(why)
    return None if reached else f"the server {opts.superlink} cannot be reached now ({why}); the node will keep trying"


def state_dir_secure(path: Path) -> bool:
    """Whether the ledger directory is closed to other users (warned about, not enforced)."""
    return not (os.stat(path).st_mode & 0o077)
