"""Flower's CLI and Control API, driven by fedtune: app directories, connections, run submission, status and
logs (asked in-process with Flower's own Control API client; the ``flwr`` CLI as fallback)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.common.errors import RunError
from fedtune.common.flower.processes import CONNECTION, POLL_S, flower_bin


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
