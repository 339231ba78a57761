"""The simulated nodes' settings reach the workers of an existing Ray cluster through Ray's runtime env hook."""

from __future__ import annotations

from fedtune.common.runtime import OWNER, SIM_NODES
from fedtune.sim import rayenv

ENV_SIM_NODES, OWNER_ENV = SIM_NODES.name, OWNER.name


def test_the_hook_adds_the_node_variables_and_keeps_flowers_own(monkeypatch):
    monkeypatch.setenv(ENV_SIM_NODES, "/shared/run/flower/nodes.json")
    monkeypatch.setenv(OWNER_ENV, "fedtune-sim:/shared/run")  # the process-owner tag stays on this machine
    monkeypatch.delenv("FEDTUNE_PRECISION", raising=False)
    env = rayenv.forward_node_env({"env_vars": {"PYTHONPATH": "/x"}, "working_dir": "."})
    assert env == {"env_vars": {"PYTHONPATH": "/x", ENV_SIM_NODES: "/shared/run/flower/nodes.json"},
                   "working_dir": "."}
    assert rayenv.forward_node_env(None)["env_vars"] == {ENV_SIM_NODES: "/shared/run/flower/nodes.json"}


def test_the_hook_is_importable_by_the_name_fedtune_sim_gives_ray():
    from ray._common.utils import load_class  # what ray.init uses for RAY_RUNTIME_ENV_HOOK

    assert load_class(rayenv.HOOK) is rayenv.forward_node_env


def test_simulated_clients_run_at_the_niceness_of_flowers_processes(tmp_path, monkeypatch):
    """Ray's default (nice 15) left the clients a few percent of a core beside any other busy process."""
    from fedtune.sim.runner import LocalSimulation, SimulationSpec

    spec = SimulationSpec(app_dir=tmp_path, run_config={}, num_clients=2, cpus_per_client=1, work_dir=tmp_path)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert LocalSimulation(spec).env["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_worker_niceness", "10")
    assert LocalSimulation(spec).env["RAY_worker_niceness"] == "10"
