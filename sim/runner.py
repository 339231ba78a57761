"""Run the fedtune ServerApp/ClientApp on Flower's simulation engine (Ray).

We start our own ``flower-superlink --simulation`` on free loopback ports with a
private ``FLWR_HOME``, submit the run with ``flwr run`` (the same app the
deployment runs), poll its status with ``flwr list --format json`` (``flwr run
--stream`` exits 0 even when a run fails), and stop every Flower process when
done — on success, failure, Ctrl-C or SIGTERM alike. The SuperLink runs in its
own process group and dies with us; Flower's detached children
(flower-superexec, flwr-simulation, Ray) carry an owner tag and are swept
(:func:`fedtune.common.flower.processes.stop_owned`). The run's own log is fetched into
the work directory before anything is stopped.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fedtune.common import exit_codes
from fedtune.common.errors import RunError
from fedtune.common.flower.control import FlwrCli, write_app_dir, write_connection
from fedtune.common.flower.processes import (
    die_with_parent,
    flower_bin,
    flower_env,
    free_port,
    start_group,
    stop_group,
    stop_owned,
    wait_healthy,
)

__all__ = ["LocalSimulation", "SignalExit", "SimulationSpec", "free_port", "handle_signals", "write_app_dir"]
RUN_LOG = "run.log"
# Ray starts its workers (the simulated clients) at nice 15, behind Flower's own processes and anything else at
# nice 0: on a busy machine the clients, which are the simulation's work, got a few percent of a core (measured: 5%
# beside another busy process). An operator's own RAY_worker_niceness wins.
RAY_WORKERS = {"RAY_worker_niceness": "0"}


@dataclass(frozen=True)
class SimulationSpec:
    app_dir: Path
    run_config: dict[str, Any]  # overrides of the app's [tool.flwr.app.config]
    num_clients: int
    cpus_per_client: int
    work_dir: Path  # FLWR_HOME and SuperLink logs live here
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment (the simulated nodes' configuration)


@dataclass
class SignalExit:
    """SIGINT and SIGTERM unwind the program like Ctrl-C (KeyboardInterrupt), so every ``with`` cleans up.

    ``exit_code`` then says which signal arrived (130 SIGINT, 143 SIGTERM).
    """

    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        first = not self.received
        self.received.append(signum)
        if first:
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return exit_codes.TERMINATED if self.received[:1] == [signal.SIGTERM] else exit_codes.INTERRUPTED


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT/SIGTERM are ignored inside (a second Ctrl-C must not interrupt the clean-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def handle_signals() -> SignalExit:
    """Install :class:`SignalExit` for SIGINT and SIGTERM; returns it (for its ``exit_code``)."""
    handler = SignalExit()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return handler


class LocalSimulation:
    """A private simulation SuperLink; use as a context manager so it is always stopped."""

    def __init__(self, spec: SimulationSpec) -> None:
        self.spec = spec
        self.home = spec.work_dir / "flwr-home"
        self.log_file = spec.work_dir / "superlink.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner = f"fedtune-sim:{spec.work_dir.resolve()}"
        self.env = RAY_WORKERS | flower_env(self.home, self.owner) | dict(spec.env)
        self.cli = FlwrCli(self.env, spec.work_dir)
        self.run_id: int | None = None

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
        try:
            self.proc = start_group(cmd, env=self.env, log_file=self.spec.work_dir / "superlink.out",
                                    preexec_fn=die_with_parent)
            wait_healthy(f"http://127.0.0.1:{self.port}/health", self.proc, self.log_file,
                         other_logs=(self.spec.work_dir / "superlink.out",))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is not None and self.run_id is not None and self.proc is not None \
                    and self.proc.poll() is None:
                self.save_logs(self.run_id, self.spec.work_dir / RUN_LOG, timeout_s=20)  # keep what the run said
        finally:
            self.stop()

    def stop(self) -> None:
        """End every Flower process of this simulation (the SuperLink's group, then anything tagged ours)."""
        with deferred_signals():
            stop_group(self.proc)
            stop_owned(self.owner)

    def submit(self) -> int:
        self.run_id = self.cli.submit(self.spec.app_dir, self.spec.run_config, self.spec.work_dir / "run-config.toml")
        return self.run_id

    def save_logs(self, run_id: int, path: Path, timeout_s: float = 120) -> Path:
        """Fetch the run's own log (ServerApp and ClientApps) into ``path``."""
        return self.cli.save_logs(run_id, path, timeout_s=timeout_s)

    def status(self, run_id: int) -> str:
        return self.cli.status(run_id)

    def wait(self, run_id: int, on_poll: Callable[[], None] | None = None, timeout_s: float = 24 * 3600) -> str:
        """Block until the run ends; return its final status (e.g. 'finished:completed')."""
        if self.proc is None:
            raise RunError("the simulation SuperLink is not running; use LocalSimulation as a context manager")
        return self.cli.wait(run_id, self.proc, self.log_file, on_poll=on_poll, timeout_s=timeout_s)
