"""Shared by tests/test_faults.py: processes by session and owner tag, waiting on files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fedtune.common.flower.processes import owned_pids


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """In its own session, so the test can find and kill everything it started."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env if env is not None else os.environ.copy())


def kill_session(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """``sig`` to the process group, then SIGKILL whatever of the session is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def kill_owned(owner: str) -> None:
    for pid in owned_pids(owner):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(what: str, cond: Callable[[], bool], timeout_s: float, alive: subprocess.Popen[bytes] | None = None,
               poll_s: float = 0.5) -> float:
    """Seconds it took for ``cond()`` to hold; AssertionError after ``timeout_s`` or if ``alive`` exits."""
    started = time.monotonic()
    while not cond():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process exited ({alive.returncode}) before: {what}")
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(poll_s)
    return time.monotonic() - started
