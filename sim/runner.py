"""Run the fedtune ServerApp/ClientApp on Flower's simulation engine (Ray).

We start our own ``flower-superlink --simulation`` on free loopback ports with a
private ``FLWR_HOME``, submit the run with ``flwr run`` (the same app the
deployment runs), poll its status with ``flwr list --format json`` (``flwr run
--stream`` exits 0 even when a run fails), and stop the SuperLink's whole process
group when done — nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from fedtune.common.errors import RunError

POLL_S = 1.0
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower console script next to this interpreter (works in venvs not on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RunError(f"'{name}' is not installed; install fedtune with its dependencies (pip install -e .)")
    return found


def write_app_dir(app_dir: Path, defaults: dict[str, Any]) -> Path:
    """A minimal Flower app: pyproject only; the code comes from the installed fedtune package."""
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedtune-app", "version": "0.1.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
            "config": defaults,
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


@dataclass(frozen=True)
class SimulationSpec:
    app_dir: Path
    run_config: dict[str, Any]  # overrides of the app's [tool.flwr.app.config]
    num_clients: int
    cpus_per_client: int
    work_dir: Path  # FLWR_HOME and SuperLink logs live here


class LocalSimulation:
    """A private simulation SuperLink; use as a context manager so it is always stopped."""

    def __init__(self, spec: SimulationSpec) -> None:
        self.spec = spec
        self.home = spec.work_dir / "flwr-home"
        self.log_file = spec.work_dir / "superlink.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = os.environ | {
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            # The SuperLink spawns flower-superexec / flwr-simulation by name.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def __enter__(self) -> LocalSimulation:
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        cmd = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--log-file", str(self.log_file),
        ]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait_healthy()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # Ray workers or flwr-simulation left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _write_connection(self) -> None:
        config = {"superlink": {"default": "fedtune", "fedtune": {
            "address": f"127.0.0.1:{self.port}", "insecure": True,
            "options": {
                "num-supernodes": self.spec.num_clients,
                "backend": {"client-resources": {"num-cpus": self.spec.cpus_per_client, "num-gpus": 0.0}},
            },
        }}}
        (self.home / "config.toml").write_text(tomli_w.dumps(config))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RunError(f"flower-superlink exited with code {self.proc.returncode}; see {self.log_file}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RunError(f"flower-superlink did not become healthy in {STARTUP_TIMEOUT_S:.0f}s; see {self.log_file}")

    def _flwr(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=self.env, capture_output=True,
                              text=True, check=False, cwd=self.spec.work_dir)
        try:
            return dict(json.loads(proc.stdout))
        except json.JSONDecodeError:
            raise RunError(f"`flwr {args[0]}` failed (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None

    def submit(self) -> int:
        overrides = self.spec.work_dir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(self.spec.run_config))
        reply = self._flwr("run", str(self.spec.app_dir), "fedtune", "--run-config", str(overrides))
        if not reply.get("success") or "run-id" not in reply:
            raise RunError(f"the run was not accepted: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def save_logs(self, run_id: int, path: Path) -> Path:
        """Fetch the run's own log (ServerApp and ClientApps) into ``path``."""
        proc = subprocess.run([_bin("flwr"), "log", str(run_id), "fedtune", "--show"], env=self.env,
                              capture_output=True, text=True, check=False, cwd=self.spec.work_dir, timeout=120)
        path.write_text(proc.stdout + proc.stderr)
        return path

    def status(self, run_id: int) -> str:
        reply = self._flwr("list", "fedtune", "--run-id", str(run_id))
        runs = reply.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def wait(self, run_id: int, on_poll: Callable[[], None] | None = None, timeout_s: float = 24 * 3600) -> str:
        """Block until the run ends; return its final status (e.g. 'finished:completed')."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if on_poll:
                on_poll()
            if status.startswith("finished"):
                return status
            if self.proc is not None and self.proc.poll() is not None:
                raise RunError(f"flower-superlink died (exit {self.proc.returncode}); see {self.log_file}")
            time.sleep(POLL_S)
        raise RunError(f"run {run_id} did not finish within {timeout_s:.0f}s")
