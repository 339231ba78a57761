"""`tensorboard --logdir results/` shows a run: the real TensorBoard server, queried over its HTTP data API."""

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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.run_results import make_results

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.load(resp)


def test_tensorboard_serves_the_runs_accuracy(tmp_path):
    results = tmp_path / "results"
    make_results(results / "20260101-120000", tensorboard=True)
    binary = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or "tensorboard"
    port = _free_port()
    proc = subprocess.Popen([binary, "--logdir", str(results), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline and not runs:
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                runs = _get(port, "/data/runs")
            time.sleep(1)
        assert runs == ["20260101-120000"]
        query = urllib.parse.urlencode({"run": runs[0], "tag": "accuracy/held-out"})
        points = _get(port, f"/data/plugin/scalars/scalars?{query}")
        assert [(step, round(value, 4)) for _, step, value in points] == [(0, 0.5), (1, 0.7), (2, 0.8)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
