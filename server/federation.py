"""The server side of a deployment: one SuperLink (TLS + node auth), its node keys and one run.

The app bundle (FAB) holds only a pyproject whose components point at the
installed fedtune package, with the package's default settings; per-run settings
travel as run-config overrides. So the bundle, and the sha256 nodes pin, change
only with the fedtune version, not with each run.

fedtune-server owns every Flower process it starts: the SuperLink runs in its own
process group and dies with its parent; Flower's detached children
(flower-superexec, flwr-serverapp) carry an owner tag and are swept on stop and at
the next start (an orphan ServerApp of a crashed server would otherwise go on
writing into the same results). A watchdog stops a run that makes no progress
(:class:`Watchdog`), so a dead node can never stall it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from fedtune.common import runtime
from fedtune.common.durable import write_atomically
from fedtune.common.errors import RunError
from fedtune.common.flower.control import FlwrCli, write_app_dir, write_connection
from fedtune.common.flower.processes import (
    die_with_parent,
    flower_env,
    start_cause,
    start_group,
    stop_group,
    stop_owned,
    wait_healthy,
)
from fedtune.common.settings import RunSettings
from fedtune.server.control_auth import new_token, write_cli_credentials
from fedtune.server.results import SUMMARY_FILE, aggregated_updates, read_rounds

log = logging.getLogger("fedtune.server")
POLL_S = 3.0  # `flwr list` is a Python process: poll gently on small machines
NODES_POLL_S = 15.0  # `flwr supernode list`, for the watchdog and the metrics


@dataclass(frozen=True)
class ServerOptions:
    """A checked server setup (see fedtune.server.daemon.preflight)."""

    work_dir: Path
    host: str  # SuperLink bind address
    port: int
    control_host: str  # how fedtune-server itself reaches the SuperLink (a name in the certificate's SANs)
    insecure: bool
    ca: Path | None
    cert: Path | None
    key: Path | None
    node_keys: tuple[Path, ...]
    run_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: Path = Path("checkpoints")
    node_wait_timeout_s: float = 600.0  # fewer nodes online than the run needs for this long: stop
    round_timeout_s: float = 600.0  # no round finished for this long with enough nodes online: stop

    @property
    def results_dir(self) -> Path:
        return Path(str(self.run_config["results-dir"]))

    @property
    def min_nodes(self) -> int:
        return int(self.run_config.get("min-clients", 1))


@dataclass(frozen=True)
class Outcome:
    """How a run ended: Flower's status, and our own stop (watchdog) if there was one."""

    status: str  # e.g. finished:completed, finished:stopped
    stop_code: str | None = None  # "nodes" / "deadline" when the watchdog stopped it
    stop_reason: str | None = None


def local_control_host(cert_path: Path) -> tuple[str, str | None]:
    """A loopback name in the server certificate's SANs, so TLS verifies on the local control connection."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    if "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}:
        return "127.0.0.1", None
    if "localhost" in sans.get_values_for_type(x509.DNSName):
        return "localhost", None
    return "127.0.0.1", (f"server certificate {cert_path} must also name 127.0.0.1 or localhost (SAN) so "
                         f"fedtune-server can reach its own control API; recreate it with --host 127.0.0.1")


class Watchdog:
    """Decides when a run has made no progress for too long.

    Progress is a new line in metrics.jsonl (a round finished) or the number of
    online nodes reaching the run's minimum. With fewer nodes online than that,
    the run may wait ``node_wait_timeout_s``; with enough, ``round_timeout_s``.
    """

    def __init__(self, opts: ServerOptions, now: float) -> None:
        self.opts = opts
        self.last_progress = now
        self.lines = -1
        self.enough_nodes = True  # until the first count says otherwise

    def observe(self, now: float, lines: int, online: int | None) -> None:
        if lines != self.lines:
            self.lines, self.last_progress = lines, now
        if online is not None:
            enough = online >= self.opts.min_nodes
            if enough and not self.enough_nodes:
                self.last_progress = now
            self.enough_nodes = enough

    def expired(self, now: float) -> tuple[str, str] | None:
        """(stop-code, reason) once the applicable deadline has passed, else None."""
        idle = now - self.last_progress
        if not self.enough_nodes and idle > self.opts.node_wait_timeout_s:
            return "nodes", (f"fewer than {self.opts.min_nodes} nodes online for {idle:.0f}s "
                             f"(--node-wait-timeout {self.opts.node_wait_timeout_s:.0f}s)")
        if self.enough_nodes and idle > self.opts.round_timeout_s:
            return "deadline", (f"no round finished for {idle:.0f}s (--round-timeout "
                                f"{self.opts.round_timeout_s:.0f}s): nodes did not answer")
        return None


class Federation:
    """Starts the SuperLink, registers nodes, submits and follows the run."""

    def __init__(self, opts: ServerOptions) -> None:
        from fedtune.common.ledger.receipts import RECORD_KEY_FILE

        self.opts = opts
        self.home = opts.work_dir / "flwr-home"
        self.logs = opts.work_dir / "logs"
        self.superlink_log = self.logs / "superlink.log"
        self.owner = f"fedtune-server:{opts.work_dir}"
        self.token_file = opts.work_dir / "control.token"
        self.env = flower_env(self.home, self.owner) | {runtime.CHECKPOINT_DIR.name: str(opts.checkpoint_dir),
                                                         runtime.CONTROL_TOKEN_FILE.name: str(self.token_file),
                                                         runtime.RECORD_KEY.name: str(opts.work_dir / RECORD_KEY_FILE)}
        self.cli = FlwrCli(self.env, opts.work_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_id: int | None = None
        self.online: int | None = None  # nodes online at the last count (for the metrics)
        self._last_line: dict[str, Any] | None = None  # the last round line logged

    @staticmethod
    def app_dir(work_dir: Path) -> Path:
        return write_app_dir(work_dir / "app", RunSettings().to_config())

    @staticmethod
    def app_hash(work_dir: Path) -> str:
        """sha256 of the FAB ``flwr run`` builds from the app directory (what nodes allow-list)."""
        from flwr.cli.build import build_fab_from_disk  # Flower internal: pinned flwr, covered by a test

        return hashlib.sha256(build_fab_from_disk(Federation.app_dir(work_dir))).hexdigest()

    def _superlink_cmd(self) -> list[str]:
        o = self.opts
        cmd = [sys.executable, "-m", "fedtune.server.control_auth", "--isolation", "subprocess", "--host", o.host,
               "--port", str(o.port), "--disable-runtime-dependency-installation",
               "--log-file", str(self.superlink_log)]
        if o.insecure:
            return [*cmd, "--insecure"]
        return [*cmd, "--ssl-ca-certfile", str(o.ca), "--ssl-certfile", str(o.cert), "--ssl-keyfile", str(o.key),
                "--enable-supernode-auth"]

    def start(self) -> None:
        o = self.opts
        o.work_dir.mkdir(parents=True, exist_ok=True)
        if leftovers := stop_owned(self.owner):
            log.warning("stopped %s Flower processes left over by a previous fedtune-server for %s (pids %s)",
                        len(leftovers), o.work_dir, leftovers)
        address = f"{o.control_host}:{o.port}"
        write_connection(self.home, address, root_certificates=None if o.insecure else o.ca)
        write_cli_credentials(self.home, address, new_token(self.token_file))
        self.proc = start_group(self._superlink_cmd(), env=self.env, log_file=self.logs / "superlink.out",
                                cwd=o.work_dir, preexec_fn=die_with_parent)
        scheme = "http" if o.insecure else "https"
        wait_healthy(f"{scheme}://{address}/health", self.proc, self.superlink_log,
                     verify=False if o.insecure else str(o.ca), other_logs=(self.logs / "superlink.out",))
        log.info("SuperLink listening on %s:%s (%s); its control API needs the operator token in %s", o.host, o.port,
                 "plaintext" if o.insecure else "TLS", self.token_file)
        for key in o.node_keys:
            node_id = self.cli.register_node(key)
            log.info("registered node key %s as node %s", key, node_id)

    def submit(self) -> int:
        app = self.app_dir(self.opts.work_dir)
        log.info("app bundle sha256 %s (nodes must allow-list it)", self.app_hash(self.opts.work_dir))
        run_id = self.cli.submit(app, self.opts.run_config, self.opts.work_dir / "run-config.toml")
        log.info("submitted run %s; checkpoints in %s", run_id, self.opts.checkpoint_dir)
        write_atomically(self.opts.work_dir / "current-run.json",
                         json.dumps({"run-id": run_id, "started": time.time()}))
        self.run_id = run_id
        return run_id

    def _rounds(self) -> list[dict[str, Any]]:
        return read_rounds(self.opts.results_dir)

    def _progress(self, rounds: list[dict[str, Any]]) -> None:
        if rounds and rounds[-1] != self._last_line:
            self._last_line = row = rounds[-1]
            log.info("round %s: held-out accuracy %s, max epsilon %s", row.get("round"), row.get("accuracy"),
                     row.get("epsilon-max"))

    def run(self) -> Outcome:
        """Start everything, follow the run to its end (or stop it when it stalls), fetch its log."""
        self.start()
        run_id = self.submit()
        outcome = self._follow(run_id)
        run_log = self.cli.save_logs(run_id, self.logs / f"run-{run_id}.log")
        log.info("run %s ended as %s; its log is %s", run_id, outcome.status, run_log)
        return outcome

    def _follow(self, run_id: int) -> Outcome:
        if self.proc is None:
            raise RunError("the SuperLink is not running")
        watchdog, next_count = Watchdog(self.opts, time.monotonic()), 0.0
        while True:
            status = self.cli.status(run_id)
            rounds = self._rounds()
            self._progress(rounds)
            now = time.monotonic()
            if now >= next_count:
                self.online, next_count = self.cli.online_nodes(), now + NODES_POLL_S
            watchdog.observe(now, len(rounds), self.online)
            if status.startswith("finished"):
                return Outcome(status)
            if self.proc.poll() is not None:
                cause = start_cause(self.superlink_log, self.logs / "superlink.out")
                raise RunError(f"flower-superlink died (exit {self.proc.returncode})" + (f": {cause}" if cause else ""))
            if expired := watchdog.expired(now):
                return self._stop_stalled(run_id, *expired)
            time.sleep(POLL_S)

    def _stop_stalled(self, run_id: int, code: str, reason: str) -> Outcome:
        """Stop the run through Flower, keep its checkpoints, and record why in summary.json."""
        log.error("stopping run %s: %s; checkpoints are kept, start fedtune-server again to resume", run_id, reason)
        self.cli.stop(run_id)
        deadline = time.monotonic() + 60
        status = self.cli.status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(POLL_S)
            status = self.cli.status(run_id)
        self.write_stop_summary(code, reason)
        return Outcome(status, code, reason)

    def write_stop_summary(self, code: str, reason: str) -> None:
        """summary.json for a run the watchdog stopped (the ServerApp could not write its own)."""
        rounds = self._rounds()
        summary = {
            "status": "stopped-early", "stop-code": code, "stop-reason": reason, "resumable": True,
            "rounds": max((int(r.get("round", 0)) for r in rounds), default=0),
            "final-accuracy": rounds[-1].get("accuracy") if rounds else None,
            "checkpoint-dir": str(self.opts.checkpoint_dir), "run-id": self.run_id,
        }
        self.opts.results_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.opts.results_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def trained_updates(self) -> int:
        """How many node updates the run aggregated, over all rounds (0: nothing was learned). A secure round
        whose sum was not aggregated (SecAgg+ did not complete) counts none: its nodes trained, but the global
        adapter did not change."""
        return aggregated_updates(self._rounds())

    def save_run_log(self, timeout_s: float = 20) -> None:
        """Fetch the run's log if the SuperLink still answers (on a signal, before stopping it)."""
        if self.run_id is not None and self.proc is not None and self.proc.poll() is None:
            path = self.cli.save_logs(self.run_id, self.logs / f"run-{self.run_id}.log", timeout_s=timeout_s)
            log.info("saved the run's log to %s", path)

    def stop(self) -> None:
        """End every Flower process this server started (SuperLink group, then anything tagged ours)."""
        stop_group(self.proc)
        stop_owned(self.owner)
        self.proc = None
