"""Keeps a node's SuperNode (and app gate) running, judged by health, not only by exit.

Flower's SuperNode retries a lost connection a few times, then logs "Giving up
reconnection" and stays alive but idle; after a server restart it would never
rejoin on its own. The supervisor reads the SuperNode's output and restarts it
when it gave up, exited, or keeps failing to connect while the server is
reachable again or while it has been silent for ``stall_timeout_s``. Restarts
back off exponentially with jitter, forever unless ``max_restarts`` is set; each
attempt is one log line. Every Flower process it starts carries an owner tag, so
stopping the node (or starting it after a crash) leaves no orphan behind.
"""

from __future__ import annotations

import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.node_check import NodeOptions
from fedtune.common import exit_codes
from fedtune.common.flower.processes import (
    die_with_parent,
    flower_bin,
    flower_env,
    start_group,
    stop_owned,
    stop_process,
)

log = logging.getLogger("fedtune.client")
EXIT_CONNECTION = 305  # flower-supernode: could not initialise the connection (TLS, key, registration)
HEALTHY_SESSION_S = 60.0  # a session this long was working: the next restart starts the backoff afresh
POLL_S = 0.5
PROBE_S = 3.0  # while the server is unreachable: how often to check whether it is back
GAVE_UP = ("Giving up reconnection", "SuperNode terminated gracefully")
FAILING = "Connection attempt failed"
WORKING = ("SuperNode ID:", "Received:", "Sending:", "Starting Flower SuperNode")


@dataclass(frozen=True)
class SessionEnd:
    """Why one SuperNode session ended."""

    reason: str
    refused: bool = False  # Flower's exit 305: TLS, key or registration refused
    lasted_s: float = 0.0


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


def failing(text: str) -> bool:
    """The SuperNode's latest word about its connection is a failed attempt."""
    last_fail = text.rfind(FAILING)
    return last_fail >= 0 and all(text.rfind(w) < last_fail for w in WORKING)


class Supervisor:
    """Runs flower-supernode (and the app gate), restarting it with backoff until told to stop."""

    def __init__(self, opts: NodeOptions, backoff: Callable[[int], float]) -> None:
        self.opts = opts
        self.backoff = backoff
        self.home = opts.state_dir / "flower"
        self.owner = f"fedtune-client:{opts.state_dir.resolve()}"
        self.env = flower_env(self.home, self.owner)
        self.stopping = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self._log_start = 0
        self.restarts = 0  # restart attempts since the daemon started (for the metrics)

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

    def _start(self) -> subprocess.Popen[bytes]:
        o = self.opts
        if leftovers := stop_owned(self.owner):
            log.warning("stopped %s Flower processes left over by an earlier session (pids %s)", len(leftovers),
                        leftovers)
        self._log_start = o.flower_log_path.stat().st_size if o.flower_log_path.exists() else 0
        secret = None if o.allowlist is None else self._secret()
        node = start_group(self._supernode_cmd(secret), env=self.env, log_file=o.flower_log_path, cwd=o.state_dir,
                           preexec_fn=die_with_parent)
        self.procs = [node]
        if secret is not None and o.allowlist is not None:
            gate_cmd = [sys.executable, "-m", "fedtune.client.gate", "--runtime-api-address",
                        f"127.0.0.1:{o.runtime_port}", "--secret-file", str(secret), "--allowlist",
                        str(o.allowlist.resolve()), "--decisions", str(o.state_dir / "app-decisions.jsonl"),
                        *([] if o.prewarm else ["--no-prewarm"])]
            self.procs.append(start_group(gate_cmd, env=self.env, log_file=o.flower_log_path, cwd=o.state_dir,
                                          preexec_fn=die_with_parent))
        log.info("SuperNode started (pid %s) towards %s%s", node.pid, o.superlink,
                 "" if secret is None else f", app gate pid {self.procs[1].pid}")
        return node

    def session(self) -> SessionEnd:
        """One SuperNode session, watched until it exits, gives up, stalls or is refused."""
        started = time.monotonic()
        node = self._start()
        end = self._watch(node, started)
        self.stop_children()
        if f"Exit Code: {EXIT_CONNECTION}" in self.session_log():
            end = SessionEnd("refused", refused=True)
        return SessionEnd(end.reason, end.refused, time.monotonic() - started)

    def _watch(self, node: subprocess.Popen[bytes], started: float) -> SessionEnd:
        size, changed, next_probe = -1, started, 0.0
        while not self.stopping:
            if node.poll() is not None:
                return SessionEnd(f"the SuperNode exited (code {node.returncode})")
            if len(self.procs) > 1 and self.procs[1].poll() is not None:
                return SessionEnd(f"the app gate exited (code {self.procs[1].returncode})")
            time.sleep(POLL_S)
            text, now = self.session_log(), time.monotonic()
            if f"Exit Code: {EXIT_CONNECTION}" in text:  # logged before Flower's slow teardown
                return SessionEnd("refused", refused=True)
            if any(marker in text for marker in GAVE_UP):
                return SessionEnd("the SuperNode gave up reconnecting")
            if len(text) != size:
                size, changed = len(text), now
            if failing(text):
                if now - changed > self.opts.stall_timeout_s:
                    return SessionEnd(f"the SuperNode failed to connect and was silent for {now - changed:.0f}s")
                if now >= next_probe:
                    next_probe = now + 5.0
                    if reachable(self.opts.superlink) is None and now - changed > 2.0:
                        return SessionEnd("the server answers again while the SuperNode is still retrying")
        return SessionEnd("stopping")

    def session_log(self) -> str:
        """What the current SuperNode session wrote so far."""
        try:
            with open(self.opts.flower_log_path, "rb") as fh:
                fh.seek(self._log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def stop_children(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, term_wait_s=10.0)
        self.procs = []
        stop_owned(self.owner, term_wait_s=5.0)

    def run(self) -> int:
        """Sessions and restarts until stopped; the exit code when --max-restarts runs out."""
        attempt, refused = 0, False
        while not self.stopping:
            why = reachable(self.opts.superlink)
            if why is not None:
                reason = f"server {self.opts.superlink} is unreachable ({why})"
            else:
                end = self.session()
                if self.stopping:
                    break
                attempt = 0 if end.lasted_s > HEALTHY_SESSION_S else attempt
                refused = end.refused
                reason = explain_305(self.session_log()[-4000:], self.opts) if end.refused else end.reason
            attempt += 1
            if self.opts.max_restarts and attempt > self.opts.max_restarts:
                log.error("giving up after %s failed attempts (--max-restarts %s): %s; see %s", attempt,
                          self.opts.max_restarts, reason, self.opts.flower_log_path)
                return exit_codes.BAD_INPUT if refused else exit_codes.FAILED
            delay = self.backoff(attempt)
            self.restarts += 1
            log.warning("restart attempt %s in %.1fs: %s", attempt, delay, reason)
            self._sleep(delay, until_reachable=why is not None)
        return exit_codes.OK

    def _sleep(self, seconds: float, until_reachable: bool = False) -> None:
        """Sleep, waking early when told to stop, or (after an unreachable server) when it answers again.

        A TCP probe every few seconds is cheap; the backoff spaces SuperNode restarts, not probes.
        """
        deadline, next_probe = time.monotonic() + seconds, time.monotonic() + PROBE_S
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
            if until_reachable and time.monotonic() >= next_probe:
                if reachable(self.opts.superlink, timeout_s=2.0) is None:
                    return
                next_probe = time.monotonic() + PROBE_S

    def stop(self) -> None:
        """From a signal handler: stop the loop; the caller's ``finally`` ends the processes."""
        log.info("stopping the node")
        self.stopping = True
