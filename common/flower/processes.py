"""Driving Flower's own processes and CLI: SuperLink/SuperNode binaries, `flwr` JSON commands.

Shared by the simulation harness and the deployment daemons. Every process we
start gets its own session (process group), so stopping it also stops what it
spawned. Flower detaches some of its own children into new sessions
(flower-superexec, and through it flwr-serverapp / flwr-simulation and Ray), so
every Flower process also inherits an owner tag (``FEDTUNE_OWNER``, :data:`fedtune.common.runtime.OWNER`) in its
environment: :func:`stop_owned` finds and ends them all, including orphans a
crashed predecessor left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from fedtune.common import runtime
from fedtune.common.errors import RunError

POLL_S = 1.0
STARTUP_TIMEOUT_S = 60.0
CONNECTION = "fedtune"
# Lines of a Flower log that explain why it could not start (the rest is noise).
_CAUSE = re.compile(r"error|address already in use|no such file|permission denied|errno|exit code|invalid|"
                    r"cannot|failed|traceback", re.IGNORECASE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """A console script next to this interpreter (works in venvs not on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RunError(f"'{name}' is not installed; install fedtune with its dependencies (pip install -e .)")
    return found


# OpenMP threads that wait by sleeping, not spinning: torch's intra-op threads otherwise spin for the next operation,
# and with Flower's other processes on the same cores (SuperLink, ServerApp, Ray) a round ran 4 to 25 times slower
# (MiniLM, 32 examples, 2 threads, one other busy process on 2 cores: 2.74 s spinning, 0.12 s passive). An operator's
# own OMP_WAIT_POLICY wins.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def flower_env(home: Path, owner: str | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, no runtime `uv sync`, owner tag, OpenMP
    threads that sleep while they wait (OPENMP_WAIT)."""
    return OPENMP_WAIT | os.environ | {
        runtime.OWNER.name: owner or f"flwr-home:{home.resolve()}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies, however (Linux prctl)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_group(cmd: list[str], *, env: Mapping[str, str], log_file: Path | None = None,
                cwd: Path | None = None, new_session: bool = True,
                preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (in its own session unless told otherwise); stdout/stderr go to ``log_file``.

    ``preexec_fn`` runs in the child before it executes ``cmd`` (e.g. to die with its parent).
    """
    out: Any = subprocess.DEVNULL
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=new_session, preexec_fn=preexec_fn)
    finally:
        if log_file is not None:
            out.close()


def stop_group(proc: subprocess.Popen[bytes] | None, term_wait_s: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL whatever is left (children included)."""
    if proc is None:
        return
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children left in the group
        os.killpg(proc.pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes] | None, term_wait_s: float = 15.0) -> None:
    """SIGTERM one process (not its group), SIGKILL it if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=term_wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5.0)


def owned_pids(owner: str) -> list[int]:
    """Processes of this user whose environment carries ``FEDTUNE_OWNER=owner`` (this process excluded)."""
    tag = f"{runtime.OWNER.name}={owner}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's process
            continue
    return found


def stop_owned(owner: str, term_wait_s: float = 10.0) -> list[int]:
    """SIGTERM every process tagged ``owner``, SIGKILL what is left; returns the pids found."""
    pids = owned_pids(owner)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (term_wait_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def start_cause(*logs: Path, lines: int = 6) -> str:
    """The lines of Flower's logs that say why a process could not start (stderr and --log-file differ)."""
    found: list[str] = []
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found += [line.strip() for line in text.splitlines() if _CAUSE.search(line)]
    if not found:
        return ""
    return " | ".join(found[-lines:])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_file: Path, *, verify: str | bool = False,
                 timeout_s: float = STARTUP_TIMEOUT_S, other_logs: tuple[Path, ...] = ()) -> None:
    """Poll ``url`` (the SuperLink's /health) until it answers; fail fast, with the cause, if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            time.sleep(0.2)  # let the logs reach the disk
            cause = start_cause(log_file, *other_logs)
            logs = ", ".join(map(str, (log_file, *other_logs)))
            raise RunError(f"flower-superlink exited with code {proc.returncode}"
                           + (f": {cause}" if cause else "") + f" (logs: {logs})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        time.sleep(0.3)
    raise RunError(f"flower-superlink did not become healthy in {timeout_s:.0f}s; see {log_file}")
