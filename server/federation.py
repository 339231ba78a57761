"""The server side of a deployment: one SuperLink (TLS + node auth), its node keys and one run.

The app bundle (FAB) holds only a pyproject whose components point at the
installed fedtune package, with the package's default settings; per-run settings
travel as run-config overrides. So the bundle, and the sha256 nodes pin, change
only with the fedtune version, not with each run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from fedtune.common.errors import RunError
from fedtune.common.flower_cli import (
    FlwrCli,
    flower_bin,
    flower_env,
    start_group,
    stop_process,
    wait_healthy,
    write_app_dir,
    write_connection,
)
from fedtune.common.settings import RunSettings
from fedtune.server.checkpoint import ENV_CHECKPOINT_DIR
from fedtune.server.results import METRICS_FILE

log = logging.getLogger("fedtune.server")
POLL_S = 3.0  # `flwr list` is a Python process: poll gently on small machines


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


class Federation:
    """Starts the SuperLink, registers nodes, submits and follows the run."""

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.home = opts.work_dir / "flwr-home"
        self.logs = opts.work_dir / "logs"
        self.superlink_log = self.logs / "superlink.log"
        self.env = flower_env(self.home) | {ENV_CHECKPOINT_DIR: str(opts.checkpoint_dir)}
        self.cli = FlwrCli(self.env, opts.work_dir)
        self.proc = None

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
        cmd = [flower_bin("flower-superlink"), "--isolation", "subprocess", "--host", o.host, "--port", str(o.port),
               "--disable-runtime-dependency-installation", "--log-file", str(self.superlink_log)]
        if o.insecure:
            return [*cmd, "--insecure"]
        return [*cmd, "--ssl-ca-certfile", str(o.ca), "--ssl-certfile", str(o.cert), "--ssl-keyfile", str(o.key),
                "--enable-supernode-auth"]

    def start(self) -> None:
        o = self.opts
        o.work_dir.mkdir(parents=True, exist_ok=True)
        address = f"{o.control_host}:{o.port}"
        write_connection(self.home, address, root_certificates=None if o.insecure else o.ca)
        self.proc = start_group(self._superlink_cmd(), env=self.env, log_file=self.logs / "superlink.out",
                                cwd=o.work_dir, new_session=False)
        scheme = "http" if o.insecure else "https"
        wait_healthy(f"{scheme}://{address}/health", self.proc, self.superlink_log,
                     verify=False if o.insecure else str(o.ca))
        log.info("SuperLink listening on %s:%s (%s)", o.host, o.port, "plaintext" if o.insecure else "TLS")
        for key in o.node_keys:
            node_id = self.cli.register_node(key)
            log.info("registered node key %s as node %s", key, node_id)

    def submit(self) -> int:
        app = self.app_dir(self.opts.work_dir)
        log.info("app bundle sha256 %s (nodes must allow-list it)", self.app_hash(self.opts.work_dir))
        run_id = self.cli.submit(app, self.opts.run_config, self.opts.work_dir / "run-config.toml")
        log.info("submitted run %s; checkpoints in %s", run_id, self.opts.checkpoint_dir)
        (self.opts.work_dir / "current-run.json").write_text(json.dumps({"run-id": run_id, "started": time.time()}))
        return run_id

    def _progress(self) -> None:
        metrics = Path(str(self.opts.run_config["results-dir"])) / METRICS_FILE
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            return
        if lines and lines[-1] != getattr(self, "_last_line", None):
            self._last_line = lines[-1]
            row = json.loads(lines[-1])
            log.info("round %s: held-out accuracy %s, max epsilon %s", row.get("round"), row.get("accuracy"),
                     row.get("epsilon-max"))

    def run(self) -> str:
        """Start everything, run to the end, fetch the run's log; return the final status."""
        self.start()
        run_id = self.submit()
        if self.proc is None:
            raise RunError("the SuperLink is not running")
        status = self.cli.wait(run_id, self.proc, self.superlink_log, on_poll=self._progress, poll_s=POLL_S)
        self._progress()
        run_log = self.cli.save_logs(run_id, self.logs / f"run-{run_id}.log")
        log.info("run %s ended as %s; its log is %s", run_id, status, run_log)
        return status

    def trained_updates(self) -> int:
        """How many node updates the run aggregated, over all rounds (0: nothing was learned)."""
        metrics = Path(str(self.opts.run_config["results-dir"])) / METRICS_FILE
        try:
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            return 0
        return sum(c.get("status") == "trained" for row in rows for c in row.get("clients", []))

    def stop(self) -> None:
        stop_process(self.proc)
