"""Run status and logs are asked in-process with Flower's Control API client; the `flwr` CLI is the fallback."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from fedtune.common.flower import control as flower_cli
from fedtune.common.flower.control import FlwrCli


def _cli(tmp_path: Path) -> FlwrCli:
    return FlwrCli({"FLWR_HOME": str(tmp_path / "home")}, tmp_path)


def test_status_is_asked_in_process_without_starting_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(flower_cli, "_control_status", lambda env, run_id: f"finished:completed ({run_id})")
    monkeypatch.setattr(FlwrCli, "json", lambda *a, **k: pytest.fail("the flwr CLI was started"))
    assert _cli(tmp_path).status(7) == "finished:completed (7)"


def test_status_falls_back_to_the_cli_when_the_client_cannot_be_built(tmp_path, monkeypatch):
    def broken(env, run_id):
        raise ImportError("flwr.cli.utils moved")

    monkeypatch.setattr(flower_cli, "_control_status", broken)
    monkeypatch.setattr(FlwrCli, "json", lambda self, *args, **k: {"runs": [{"status": "running"}]})
    assert _cli(tmp_path).status(7) == "running"


def test_logs_fall_back_to_the_cli(tmp_path, monkeypatch):
    def broken(env, run_id):
        raise ConnectionError("refused")

    class Done:
        stdout, stderr = "the run's log\n", ""

    monkeypatch.setattr(flower_cli, "_control_logs", broken)
    monkeypatch.setattr(flower_cli.subprocess, "run", lambda *a, **k: Done())
    path = _cli(tmp_path).save_logs(7, tmp_path / "run.log")
    assert path.read_text() == "the run's log\n"


def test_the_in_process_client_reads_the_connection_of_its_own_flwr_home(tmp_path, monkeypatch):
    """Built from FLWR_HOME's config (not this process's environment), once per home; no SuperLink needed."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "elsewhere"))
    flower_cli.write_connection(tmp_path / "home", "127.0.0.1:9")
    monkeypatch.setattr(flower_cli, "_CONTROL", {})
    env = {"FLWR_HOME": str(tmp_path / "home")}
    client = flower_cli._control(env)
    assert flower_cli._control(env) is client and list(flower_cli._CONTROL) == [env["FLWR_HOME"]]
    assert os.environ["FLWR_HOME"] == str(tmp_path / "elsewhere")  # restored
    with pytest.raises(httpx.ConnectError):  # nothing listens on port 9: the client really connects there
        flower_cli._control_status(env, 1)


def test_flower_processes_get_openmp_threads_that_sleep_while_they_wait(tmp_path, monkeypatch) -> None:
    """Spinning intra-op threads made a simulated round 4-25x slower beside Flower's other processes; an
    operator's own setting wins."""
    from fedtune.common.flower.processes import flower_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert flower_env(tmp_path)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert flower_env(tmp_path)["OMP_WAIT_POLICY"] == "ACTIVE"
