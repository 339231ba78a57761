"""``fedtune-client``: the node daemon a hospital or bank runs next to its data.

It checks everything first (CA, node key, data file and schema, policy, state
directory, app allow-list) and reports every problem at once; then it runs
Flower's SuperNode with TLS, node authentication and the node config, plus the
app gate (:mod:`fedtune.client.gate`) that refuses app bundles not on the
allow-list. It reconnects with exponential backoff, writes everything to a log
file, and explains the two failures operators meet most: the server cannot be
reached, or it refused this node's key (Flower exits 305).

    fedtune-client --superlink fl.example.org:443 --root-certificates ca.pem --node-key node.key \\
        --data /srv/data/notes.csv --policy /etc/fedtune/policy.toml --state-dir /var/lib/fedtune \\
        --app-allowlist /etc/fedtune/allowed-apps.txt
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedtune.client.node_check import NodeOptions, check
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.flower_cli import flower_bin, flower_env, start_group, stop_process

log = logging.getLogger("fedtune.client")
EXIT_CONNECTION = 305  # flower-supernode: could not initialise the connection (TLS, key, registration)
BACKOFF_START_S, BACKOFF_MAX_S = 2.0, 60.0
HEALTHY_SESSION_S = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--superlink", required=True, help="host:port of the federation server (fleet API)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) that signed the server's")
    p.add_argument("--node-key", type=Path, help="this node's OpenSSH EC private key (registered by the operator)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext transport, for local tests only; refused together with --node-key")
    p.add_argument("--data", type=Path, required=True, help="the node's examples: CSV, JSONL or Parquet")
    p.add_argument("--text-column", default="text", help="column with the text (default: text)")
    p.add_argument("--label-column", default="label", help="column with the label (default: label)")
    p.add_argument("--labels", default="", help="comma-separated allowed labels (default: any)")
    p.add_argument("--policy", type=Path, help="the node's privacy policy (TOML)")
    p.add_argument("--state-dir", type=Path, required=True, help="privacy state and ledger (back this up)")
    p.add_argument("--app-allowlist", type=Path, help="file of sha256 digests of app bundles this node may run")
    p.add_argument("--allow-any-app", action="store_true", help="run any app the server sends (no pinning)")
    p.add_argument("--log-file", type=Path, help="default: STATE_DIR/fedtune-client.log")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="node-local Runtime API port; give each node on one host its own (default 9094)")
    p.add_argument("--max-restarts", type=int, default=0, help="give up after N failed restarts (0: never)")
    p.add_argument("--connect-retries", type=int, default=8,
                   help="SuperNode's retries of a failed request before the daemon restarts it (default 8)")
    p.add_argument("--check", action="store_true", help="only run the checks, then exit")
    return p


def options(args: argparse.Namespace) -> NodeOptions:
    return NodeOptions(
        superlink=args.superlink, data=args.data, state_dir=args.state_dir,
        root_certificates=args.root_certificates, node_key=args.node_key, insecure=args.insecure,
        policy=args.policy, allowlist=args.app_allowlist, allow_any_app=args.allow_any_app,
        text_column=args.text_column, label_column=args.label_column,
        labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()),
        log_file=args.log_file, runtime_port=args.runtime_port, max_restarts=args.max_restarts,
        connect_retries=args.connect_retries,
    )


def reachable(address: str, timeout_s: float = 5.0) -> str | None:
    """None if a TCP connection to ``host:port`` opens, else the reason."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except (OSError, ValueError) as err:
        return str(err) or type(err).__name__


def explain_305(log_tail: str, opts: NodeOptions) -> str:
    """Turn Flower's connection failure into what the operator has to do."""
    low = log_tail.lower()
    if opts.node_key is not None and ("failed to activate" in low or "not registered" in low):
        return (f"the server refused this node's key {opts.node_key}: it is not registered. Send "
                f"{opts.node_key.with_suffix('.pub')} to the federation operator (fedtune-server --node-keys)")
    if "certificate_verify_failed" in low or "ssl:" in low or "sslerror" in low:
        return (f"TLS with {opts.superlink} failed: check that --root-certificates is the federation's CA and the "
                f"server certificate names the host you connect to")
    if opts.insecure and "disconnected without sending a response" in low:
        return f"{opts.superlink} refused a plaintext connection: the server requires TLS (use --root-certificates)"
    return f"the server at {opts.superlink} refused the connection"


class Supervisor:
    """Runs flower-supernode (and the app gate), restarting with backoff until told to stop."""

    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.home = opts.state_dir / "flower"
        self.env = flower_env(self.home)
        self.stopping = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self._log_start = 0

    def _supernode_cmd(self, secret_file: Path | None) -> list[str]:
        o = self.opts
        cmd = [flower_bin("flower-supernode"), "--superlink", o.superlink, "--node-config", o.node_config,
               "--port", str(o.runtime_port), "--max-retries", str(o.connect_retries)]
        cmd += ["--insecure"] if o.insecure else ["--root-certificates", str(o.root_certificates)]
        if o.node_key is not None:
            cmd += ["--auth-supernode-private-key", str(o.node_key)]
        if secret_file is None:
            return [*cmd, "--isolation", "subprocess"]
        return [*cmd, "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]

    def _secret(self) -> Path:
        """A fresh SuperExec secret per start: only the gate can acquire tasks from the SuperNode."""
        path = self.home / "superexec.secret"
        self.home.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(secrets.token_bytes(32))
        return path

    def start_once(self) -> int:
        """One SuperNode session; returns its exit code (305 also when only its log says so)."""
        o = self.opts
        self._log_start = o.log_path.stat().st_size if o.log_path.exists() else 0
        secret = None if o.allowlist is None else self._secret()
        node = start_group(self._supernode_cmd(secret), env=self.env, log_file=o.log_path, cwd=o.state_dir,
                           new_session=False)
        self.procs = [node]
        if secret is not None and o.allowlist is not None:
            gate_cmd = [sys.executable, "-m", "fedtune.client.gate", "--runtime-api-address",
                        f"127.0.0.1:{o.runtime_port}", "--secret-file", str(secret), "--allowlist",
                        str(o.allowlist.resolve()), "--decisions", str(o.state_dir / "app-decisions.jsonl")]
            self.procs.append(start_group(gate_cmd, env=self.env, log_file=o.log_path, cwd=o.state_dir,
                                          new_session=False))
        log.info("SuperNode started (pid %s) towards %s%s", node.pid, o.superlink,
                 "" if secret is None else f", app gate pid {self.procs[1].pid}")
        refused = False
        while node.poll() is None and not refused:
            if len(self.procs) > 1 and self.procs[1].poll() is not None and not self.stopping:
                log.error("the app gate exited (code %s); restarting the node", self.procs[1].returncode)
                break
            time.sleep(0.5)
            # Flower logs the exit code before it tears down its threads, which can take a while.
            refused = f"Exit Code: {EXIT_CONNECTION}" in self._session_log()
        self.stop_children()
        if refused or f"Exit Code: {EXIT_CONNECTION}" in self._session_log():
            return EXIT_CONNECTION
        return node.returncode if node.returncode is not None else 1

    def stop_children(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, term_wait_s=10.0)
        self.procs = []

    def _session_log(self) -> str:
        """What the current SuperNode session wrote to the log so far."""
        try:
            with open(self.opts.log_path, "rb") as fh:
                fh.seek(self._log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def run(self) -> int:
        delay, failures, refused = BACKOFF_START_S, 0, False
        while not self.stopping:
            if (why := reachable(self.opts.superlink)) is not None:
                log.error("server %s is unreachable (%s); retrying in %.0fs", self.opts.superlink, why, delay)
            else:
                started = time.monotonic()
                code = self.start_once()
                if self.stopping:
                    break
                if time.monotonic() - started > HEALTHY_SESSION_S:  # it was up and working: reconnect quickly
                    delay, failures = BACKOFF_START_S, 0
                if code == EXIT_CONNECTION:  # retried too: the operator may register the key any minute
                    log.error("%s; retrying in %.0fs", explain_305(self._session_log()[-4000:], self.opts), delay)
                    refused = True
                else:
                    log.warning("SuperNode session ended (exit code %s; e.g. the server restarted); reconnecting "
                                "in %.0fs", code, delay)
            failures += 1
            if self.opts.max_restarts and failures > self.opts.max_restarts:
                log.error("giving up after %s failed attempts; see %s", failures, self.opts.log_path)
                return 3 if refused else 1
            time.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)
        return 0

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping the node", signum)
        self.stopping = True
        self.stop_children()


def _setup_logging(path: Path) -> None:
    fmt = logging.Formatter("%(asctime)s fedtune-client %(levelname)s %(message)s")
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path), logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = options(args)
    try:
        check(opts)
    except FedtuneError as err:
        n = len(err.problems)
        print(f"fedtune-client: {n} problem{'s' if n > 1 else ''} must be fixed before this node can start:\n"
              + "\n".join(f"- {p}" for p in err.problems), file=sys.stderr)
        return 2
    if args.check:
        print("fedtune-client: all checks passed")
        return 0
    _setup_logging(opts.log_path)
    if opts.insecure:
        log.warning("--insecure: the connection to %s is NOT encrypted; use this only for local tests",
                    opts.superlink)
    if opts.allowlist is None:
        log.warning("--allow-any-app: this node will run any app bundle the server sends")
    sup = Supervisor(opts)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    try:
        return sup.run()
    except ConfigError as err:
        log.error("%s", err)
        return 2
    finally:
        sup.stop_children()


if __name__ == "__main__":
    sys.exit(main())
