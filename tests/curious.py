"""Run a scripted (curious or malicious) ServerApp against the real fedtune ClientApp on Flower's simulation engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedtune.sim.runner import LocalSimulation, SimulationSpec


def run_scripted_server(app: Path, tmp_path: Path, env: dict[str, str], *, num_clients: int,
                        run_config: dict[str, Any]) -> tuple[Any, str]:
    """Copy the app folder ``app`` (its pyproject names the ServerApp and fedtune's ClientApp), run it on
    ``num_clients`` simulated nodes set up by ``sim.nodes.prepare`` (``env``), and return what the ServerApp wrote
    to the run config's ``out`` (JSON) and the run's log. The run must complete."""
    app_dir = tmp_path / "app"
    shutil.copytree(app, app_dir)
    out = tmp_path / "observed.json"
    spec = SimulationSpec(app_dir=app_dir, run_config={**run_config, "out": str(out)}, num_clients=num_clients,
                          cpus_per_client=2, work_dir=tmp_path / "flower", env=env)
    with LocalSimulation(spec) as sim:
        run_id = sim.submit()
        status = sim.wait(run_id, timeout_s=600)
        log = sim.save_logs(run_id, tmp_path / "run.log").read_text()
    assert status.endswith("completed"), log[-3000:]
    return json.loads(out.read_text()), log
