"""Simulation only: per-client policies and a persistent state directory for simulated nodes.

Simulated nodes have no node config of their own (only ``partition-id`` and
``num-partitions``), so ``fedtune-sim --policy-dir DIR --state-dir DIR`` writes
this small file into the run's results directory and each simulated ClientApp
reads it. Client ``<pid>`` uses ``DIR/client-<pid>.toml`` (else
``DIR/default.toml``, else the run's requested epsilon as its budget) and keeps
its ledger in ``STATE/client-<pid>/`` (default ``<results-dir>/clients/client-<pid>/``).
Deployment nodes use ``--node-config "policy=... state-dir=..."`` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import ConfigError

SIM_NODES_FILE = "simulation-nodes.json"


@dataclass(frozen=True)
class SimulationNodes:
    policy_dir: Path | None = None  # holds client-<pid>.toml and/or default.toml
    state_dir: Path | None = None  # parent of client-<pid>/ (ledger, ledger key); persists across runs

    def write(self, results_dir: Path) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / SIM_NODES_FILE
        path.write_text(json.dumps({
            "policy-dir": str(self.policy_dir.resolve()) if self.policy_dir else "",
            "state-dir": str(self.state_dir.resolve()) if self.state_dir else "",
        }, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, results_dir: Path) -> SimulationNodes:
        path = results_dir / SIM_NODES_FILE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(Path(raw["policy-dir"]) if raw.get("policy-dir") else None,
                       Path(raw["state-dir"]) if raw.get("state-dir") else None)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); re-run fedtune-sim") from err

    def policy_file(self, partition_id: int) -> Path | None:
        if self.policy_dir is None:
            return None
        if not self.policy_dir.is_dir():
            raise ConfigError(f"--policy-dir {self.policy_dir} is not a directory")
        for name in (f"client-{partition_id}.toml", "default.toml"):
            if (self.policy_dir / name).is_file():
                return self.policy_dir / name
        return None

    def client_state_dir(self, results_dir: Path, partition_id: int) -> Path:
        return (self.state_dir or results_dir / "clients") / f"client-{partition_id}"
