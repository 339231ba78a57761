"""Simulated nodes, set up like deployed ones: each gets its own data file, policy file, state directory.

``fedtune-sim`` plays every simulated node's operator. Before the federation starts it splits the
run's dataset once (:func:`fedtune.common.data.table.federation_split`: the server's held-out set, then the
training pool), partitions the pool with ``flwr-datasets``, writes each partition to
``OUT/clients/client-<id>/data.parquet``, a policy file for each node that has none, and one node
configuration file that the simulated ClientApps read through ``FEDTUNE_SIM_NODES``
(``fedtune.client.node_config``). The simulated ClientApp then runs exactly the code path of a
deployed node: its data, policy, budget key and randomness are its own, never the run config's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedtune.client.node_config import write_simulation_nodes
from fedtune.client.policy import NodePolicy, load_policy, policy_toml
from fedtune.common import runtime
from fedtune.common.data.table import LabelledData, federation_split
from fedtune.common.errors import ConfigError
from fedtune.common.ledger.key import KEY_FILE, load_or_create_key, public_path
from fedtune.common.ledger.receipts import RECORD_KEY_FILE
from fedtune.common.ledger.store import LEDGER_FILE
from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task
from fedtune.sim.partition import make_partitioner

NODES_FILE = "nodes.json"
ROSTER_FILE = "roster.toml"  # OUT/clients/roster.toml: fedtune-audit --roster


@dataclass(frozen=True)
class SimulatedNodes:
    """Where simulated nodes keep their files (fedtune-sim options)."""

    out: Path  # the run's results directory
    num_clients: int
    policy_dir: Path | None = None  # client-<id>.toml or default.toml (else a policy from the run's request)
    state_dir: Path | None = None  # parent of client-<id>/ (ledger): keeps budgets across runs
    insecure_seed: int | None = None  # simulation only: reproducible sampling and noise

    def client_dir(self, pid: int) -> Path:
        return self.out / "clients" / f"client-{pid}"

    def state(self, pid: int) -> Path:
        return (self.state_dir or self.out / "clients") / f"client-{pid}"

    def witness(self, pid: int) -> Path:
        """Beside the node's state directory, not in it (as fedtune-client keeps it)."""
        return (self.state_dir or self.out / "clients") / f"client-{pid}.witness.json"

    @property
    def roster(self) -> Path:
        return self.out / "clients" / ROSTER_FILE

    def policy_file(self, pid: int) -> Path | None:
        if self.policy_dir is None:
            return None
        if not self.policy_dir.is_dir():
            raise ConfigError(f"--policy-dir {self.policy_dir} is not a directory")
        for name in (f"client-{pid}.toml", "default.toml"):
            if (self.policy_dir / name).is_file():
                return self.policy_dir / name
        return None


def dataset_name(settings: RunSettings) -> str:
    source = settings.data.dataset
    return Path(source).stem if Path(source).suffix else source


def default_policy(settings: RunSettings, pid: int) -> NodePolicy:
    """A simulated node without a policy file: the run's requested epsilon, delta and accountant become its
    budget (the researcher is both server and node), and it releases train loss and local evaluation."""
    p = settings.privacy
    return NodePolicy(max_epsilon=p.epsilon, delta=p.delta, accountant=p.accountant, require_dp=p.dp,
                      dataset_id=f"{dataset_name(settings)}/client-{pid}", release_train_loss=True,
                      release_local_eval=True, source="fedtune-sim default")


def prepare(settings: RunSettings, nodes: SimulatedNodes) -> dict[str, str]:
    """Write every simulated node's data, policy and the node configuration file; return the environment
    the simulation's processes need (``FEDTUNE_SIM_NODES``)."""
    d, seed = settings.data, settings.federation.seed
    task = get_task(settings.model.task)
    pool, _ = federation_split(task.load_data(d), d.test_fraction, seed, d.max_train_examples)
    configs: dict[int, dict[str, object]] = {}
    roster: list[dict[str, str]] = []
    for pid, part in enumerate(_partitions(pool, settings, nodes.num_clients)):
        data_path = task.write_partition(part, nodes.client_dir(pid))
        policy = nodes.policy_file(pid)
        if policy is None:
            policy = nodes.client_dir(pid) / "policy.toml"
            policy.write_text(policy_toml(default_policy(settings, pid)))
        loaded = load_policy(policy)  # a bad policy file is an operator mistake: report it before anything starts
        # The node's ledger key, made now (as `fedtune-certs node` does for a deployed node) so the roster names it.
        key = Path(loaded.ledger_key) if loaded.ledger_key else nodes.state(pid) / KEY_FILE
        load_or_create_key(key)
        config: dict[str, object] = {
            "data-path": str(data_path.resolve()), "state-dir": str(nodes.state(pid).resolve()),
            "policy": str(policy.resolve()), "text-column": "text", "label-column": "label",
            "task": task.name, "labels": list(pool.label_names),  # the node's declaration: the run's own
            "node": f"simulation:client-{pid}", "witness": str(nodes.witness(pid).resolve())}
        if nodes.insecure_seed is not None:
            config["insecure-seed"] = nodes.insecure_seed
        configs[pid] = config
        roster.append({"id": f"simulation:client-{pid}", "public-key": _relative(public_path(key), nodes.roster),
                       "ledger": _relative(nodes.state(pid) / LEDGER_FILE, nodes.roster),
                       "policy": _relative(policy, nodes.roster)})
    nodes.roster.write_text(tomli_w.dumps({"node": roster}))
    path = write_simulation_nodes(nodes.out / "flower" / NODES_FILE, configs)
    return {runtime.SIM_NODES.name: str(path.resolve()),
            runtime.RECORD_KEY.name: str((nodes.out / "flower" / RECORD_KEY_FILE).resolve())}


def _partitions(pool: LabelledData, settings: RunSettings, num_clients: int) -> list[LabelledData]:
    """Each node's share of the training pool; one node (the central baseline) holds all of it, whatever the
    partitioner settings say (they have nothing to split)."""
    if num_clients == 1:
        return [pool]
    partitioner = make_partitioner(pool.dataset, settings.data, num_clients, settings.federation.seed)  # split once
    return [LabelledData(partitioner.load_partition(pid), pool.label_names) for pid in range(num_clients)]


def _relative(path: Path, roster: Path) -> str:
    """A roster path relative to the roster when it lies below the results directory (portable results)."""
    try:
        return os.path.relpath(path.resolve(), roster.parent.resolve()) if path.resolve().is_relative_to(
            roster.parent.parent.resolve()) else str(path.resolve())
    except ValueError:
        return str(path.resolve())
