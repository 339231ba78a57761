"""Run the fedtune ServerApp/ClientApp on Flower's simulation engine (Ray).

We start our own ``flower-superlink --simulation`` on free loopback ports with a
private ``FLWR_HOME``, submit the run with ``flwr run`` (the same app the
deployment runs), poll its status with ``flwr list --format json`` (``flwr run
--stream`` exits 0 even when a run fails), and stop the SuperLink's whole process
group when done — nothing is left running.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.errors import RunError
from fedtune.common.flower_cli import (
    FlwrCli,
    flower_bin,
    flower_env,
    free_port,
    start_group,
    stop_group,
    wait_healthy,
    write_app_dir,
    write_connection,
)

__all__ = ["LocalSimulation", "SimulationSpec", "free_port", "write_app_dir"]


@dataclass(frozen=True)
class SimulationSpec:
    app_dir: Path
    run_config: dict[str, Any]  # overrides of the app's [tool.flwr.app.config]
    num_clients: int
    cpus_per_client: int
    work_dir: Path  # FLWR_HOME and SuperLink logs live here
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment (the simulated nodes' configuration)


class LocalSimulation:
    """A private simulation SuperLink; use as a context manager so it is always stopped."""

    def __init__(self, spec: SimulationSpec) -> None:
        self.spec = spec
        self.home = spec.work_dir / "flwr-home"
        self.log_file = spec.work_dir / "superlink.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = flower_env(self.home) | dict(spec.env)
        self.cli = FlwrCli(self.env, spec.work_dir)

    def __enter__(self) -> LocalSimulation:
        write_connection(self.home, f"127.0.0.1:{self.port}", options={
            "num-supernodes": self.spec.num_clients,
            "backend": {"client-resources": {"num-cpus": self.spec.cpus_per_client, "num-gpus": 0.0}},
        })
        cmd = [
            flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--log-file", str(self.log_file),
        ]
        self.proc = start_group(cmd, env=self.env)
        wait_healthy(f"http://127.0.0.1:{self.port}/health", self.proc, self.log_file)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_group(self.proc)

    def submit(self) -> int:
        return self.cli.submit(self.spec.app_dir, self.spec.run_config, self.spec.work_dir / "run-config.toml")

    def save_logs(self, run_id: int, path: Path) -> Path:
        """Fetch the run's own log (ServerApp and ClientApps) into ``path``."""
        return self.cli.save_logs(run_id, path)

    def status(self, run_id: int) -> str:
        return self.cli.status(run_id)

    def wait(self, run_id: int, on_poll: Callable[[], None] | None = None, timeout_s: float = 24 * 3600) -> str:
        """Block until the run ends; return its final status (e.g. 'finished:completed')."""
        if self.proc is None:
            raise RunError("the simulation SuperLink is not running; use LocalSimulation as a context manager")
        return self.cli.wait(run_id, self.proc, self.log_file, on_poll=on_poll, timeout_s=timeout_s)

