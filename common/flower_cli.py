"""Driving Flower's own processes and CLI: SuperLink/SuperNode binaries, `flwr` JSON commands.

Shared by the simulation harness and the deployment daemons. Every process we
start gets its own session (process group), so stopping it also stops what it
spawned. Flower detaches some of its own children into new sessions
(flower-superexec, and through it flwr-serverapp / flwr-simulation and Ray), so
every Flower process also inherits an owner tag (:data:`OWNER_ENV`) in its
environment: :func:`stop_owned` finds and ends them all, including orphans a
crashed predecessor left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from fedtune.common.errors import RunError

POLL_S = 1.0
STARTUP_TIMEOUT_S = 60.0
CONNECTION = "fedtune"
OWNER_ENV = "FEDTUNE_OWNER"  # inherited by every Flower process we start; see stop_owned
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


def flower_env(home: Path, owner: str | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, no runtime `uv sync`, owner tag."""
    return os.environ | {
        OWNER_ENV: owner or f"flwr-home:{home.resolve()}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def write_app_dir(app_dir: Path, defaults: Mapping[str, Any]) -> Path:
    """A minimal Flower app: pyproject only; the code comes from the installed fedtune package.

    Its content (hence the FAB hash nodes pin) depends only on ``defaults``.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedtune-app", "version": "0.1.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
            "config": dict(defaults),
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


def write_connection(home: Path, address: str, *, root_certificates: Path | None = None,
                     options: Mapping[str, Any] | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with one connection named :data:`CONNECTION`."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    if options:
        conn["options"] = dict(options)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


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
    """Processes of this user whose environment carries ``OWNER_ENV=owner`` (this process excluded)."""
    tag = f"{OWNER_ENV}={owner}".encode()
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


_CONTROL: dict[str, Any] = {}  # FLWR_HOME -> Flower's Control API client, one per connection and process


def _control(env: Mapping[str, str]) -> Any:
    """Flower's own Control API client for the connection in ``env['FLWR_HOME']`` (address, TLS root
    certificates, the CLI's stored login), built once per process exactly as the `flwr` CLI builds it: a
    poll then costs one HTTP request, not a new Python process (about a CPU-second each)."""
    home = env["FLWR_HOME"]
    if home not in _CONTROL:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        saved = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = home
        try:  # quietly: Flower prints which SuperLink it uses, as the CLI would
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _CONTROL[home] = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = saved
    return _CONTROL[home]


def _control_status(env: Mapping[str, str], run_id: int) -> str:
    """``run_id``'s status as `flwr list` shows it (e.g. 'finished:completed'), asked in this process."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    reply = _control(env).ListRuns(ListRunsRequest(run_id=run_id))
    runs = [run_from_proto(proto) for proto in reply.run_dict.values()]
    if not runs:
        return "unknown"
    status = runs[0].status
    return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)


def _control_logs(env: Mapping[str, str], run_id: int) -> str:
    """The run's log so far, as `flwr log RUN --show` prints it, asked in this process."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    for reply in _control(env).StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
        return str(reply.log_output)
    return ""


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


@dataclass(frozen=True)
class FlwrCli:
    """The `flwr` CLI against the connection in ``env['FLWR_HOME']``, with JSON replies."""

    env: Mapping[str, str]
    cwd: Path

    def json(self, *args: str, timeout_s: float = 300) -> dict[str, Any]:
        proc = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=dict(self.env),
                              capture_output=True, text=True, check=False, cwd=self.cwd, timeout=timeout_s)
        try:
            return dict(json.loads(proc.stdout))
        except json.JSONDecodeError:
            raise RunError(f"`flwr {args[0]}` failed (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-800:]}") from None

    def submit(self, app: Path, run_config: Mapping[str, Any], config_file: Path) -> int:
        """Submit ``app`` (a directory or a .fab) with run-config overrides; return the run id."""
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        reply = self.json("run", str(app), CONNECTION, "--run-config", str(config_file))
        if not reply.get("success") or "run-id" not in reply:
            raise RunError(f"the run was not accepted: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def register_node(self, public_key: Path) -> int:
        reply = self.json("supernode", "register", str(public_key), CONNECTION)
        if not reply.get("success") or "node-id" not in reply:
            raise RunError(f"could not register node key {public_key}: {reply.get('error-message', reply)}")
        return int(reply["node-id"])

    def stop(self, run_id: int) -> bool:
        """Ask the SuperLink to stop a run (``flwr stop``); True when it accepted."""
        try:
            return bool(self.json("stop", str(run_id), CONNECTION, timeout_s=60).get("success"))
        except (RunError, subprocess.TimeoutExpired):
            return False

    def online_nodes(self) -> int | None:
        """How many registered nodes are online now (None when the SuperLink does not answer)."""
        try:
            nodes = self.json("supernode", "list", CONNECTION, timeout_s=60).get("nodes", [])
        except (RunError, subprocess.TimeoutExpired):
            return None
        return sum("online" in str(n.get("status", "")).lower() for n in nodes)

    def status(self, run_id: int) -> str:
        """The run's status, e.g. 'running' or 'finished:completed' (asked in this process; through `flwr list`
        when Flower's Control API client cannot be built here)."""
        with contextlib.suppress(Exception):  # any failure of the in-process client: ask the CLI instead
            return _control_status(self.env, run_id)
        runs = self.json("list", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def save_logs(self, run_id: int, path: Path, timeout_s: float = 120) -> Path:
        """Fetch the run's own log (ServerApp and ClientApps) into ``path`` (what came back before a timeout)."""
        with contextlib.suppress(Exception):  # the in-process client failed: ask the CLI below
            text = _control_logs(self.env, run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        try:
            proc = subprocess.run([flower_bin("flwr"), "log", str(run_id), CONNECTION, "--show"], env=dict(self.env),
                                  capture_output=True, text=True, check=False, cwd=self.cwd, timeout=timeout_s)
            text = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            text += f"\n[fedtune: `flwr log` did not finish within {timeout_s:.0f}s]\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def wait(self, run_id: int, proc: subprocess.Popen[bytes], log_file: Path, *,
             on_poll: Callable[[], None] | None = None, timeout_s: float = 24 * 3600, poll_s: float = POLL_S) -> str:
        """Block until the run ends; return its final status (e.g. 'finished:completed')."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if on_poll:
                on_poll()
            if status.startswith("finished"):
                return status
            if proc.poll() is not None:
                raise RunError(f"flower-superlink died (exit {proc.returncode}); see {log_file}")
            time.sleep(poll_s)
        raise RunError(f"run {run_id} did not finish within {timeout_s:.0f}s")
