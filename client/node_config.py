"""The node's own configuration: where its data, policy and ledger are. Never anything the server sends.

A deployed node gets it from ``flower-supernode --node-config "k=v ..."`` (``fedtune-client`` builds
that). Flower's simulation engine gives simulated nodes only ``partition-id`` and ``num-partitions``,
so ``fedtune-sim`` (acting as every simulated node's operator) writes one JSON file with each
simulated node's configuration — the same keys — and names it in the environment variable
``FEDTUNE_SIM_NODES`` of the processes it starts. The run config, which the server chooses, is never
read for any of this.

Keys: ``data-path``, ``state-dir``, ``policy`` (all required), ``text-column``, ``label-column``
(default ``text`` / ``label``), ``task`` and ``labels`` (the node's declaration: which task it trains and
its label or tag set; a request for another task or other labels is refused before any row is read, so
the refusal depends on the declaration, never on the rows), ``node`` (the node's identity in its ledger
header: the sha256 of its authentication key, or ``simulation:client-<id>``), ``witness`` (the ledger's
witness file, kept outside the state directory) and — simulation only — ``insecure-seed``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common import runtime
from fedtune.common.errors import ConfigError
from fedtune.common.tasks import DEFAULT_TASK, TASKS

SIMULATED = "partition-id"


@dataclass(frozen=True)
class NodeConfig:
    data_path: Path  # the node's examples (CSV / JSONL / Parquet)
    state_dir: Path  # ledger, ledger key, witness, local split seed
    policy: Path  # the node's privacy policy (TOML)
    text_column: str = "text"
    label_column: str = "label"
    task: str = DEFAULT_TASK  # the task this node trains (declared by its operator)
    labels: tuple[str, ...] = ()  # its declared label / tag set (empty: it trains no labelled task)
    node: str = ""  # identity written into the ledger header
    witness: Path | None = None  # the ledger's witness (newest line and hash), outside state_dir
    simulated: bool = False
    # Simulation only (fedtune-sim --insecure-reproducible-seed): sampling and noise drawn from a seeded
    # generator, so a run can be repeated exactly. Recorded in every ledger entry; never in deployment.
    insecure_seed: int | None = None
    partition_id: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, simulated: bool) -> NodeConfig:
        problems = [f"node config is missing '{k}'" for k in ("data-path", "state-dir", "policy") if not raw.get(k)]
        seed = raw.get("insecure-seed")
        if seed is not None and not simulated:
            problems.append("insecure-seed is only allowed for simulated nodes (fedtune-sim)")
        task = str(raw.get("task", DEFAULT_TASK))
        if task not in TASKS:
            problems.append(f"node config 'task' must be one of {', '.join(TASKS)}, got {task[:64]!r}")
        try:
            labels = parse_labels(raw.get("labels", ()))
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ConfigError(problems)
        return cls(
            data_path=Path(str(raw["data-path"])), state_dir=Path(str(raw["state-dir"])),
            policy=Path(str(raw["policy"])), text_column=str(raw.get("text-column", "text")),
            label_column=str(raw.get("label-column", "label")), task=task, labels=labels,
            node=str(raw.get("node", "")),
            witness=Path(str(raw["witness"])) if raw.get("witness") else None,
            simulated=simulated, insecure_seed=None if seed is None else int(seed),
            partition_id=int(raw[SIMULATED]) if SIMULATED in raw else None,
        )


def parse_labels(raw: Any) -> tuple[str, ...]:
    """A declared label set: a list (simulation's JSON), or a string holding a JSON list or comma-separated names
    (``flower-supernode --node-config``); ValueError naming the problem."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("[") else [x.strip() for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise ValueError(f"node config 'labels' is not a JSON list of names ({err})") from err
    if not isinstance(raw, list | tuple) or not all(isinstance(x, str) and x and len(x) <= 128 for x in raw):
        raise ValueError("node config 'labels' must be a list of non-empty names of at most 128 characters")
    if len(set(raw)) != len(raw):
        raise ValueError("node config 'labels' names a label twice")
    return tuple(raw)


@functools.lru_cache(maxsize=4)
def _simulation_nodes(path: str) -> dict[str, dict[str, Any]]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{runtime.SIM_NODES.name}={path} is unreadable ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{runtime.SIM_NODES.name}={path} must hold a JSON object keyed by partition id")
    return raw


def write_simulation_nodes(path: Path, nodes: Mapping[int, Mapping[str, Any]]) -> Path:
    """fedtune-sim: one node config per partition id (read by simulated ClientApps via runtime.SIM_NODES)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): dict(v) for k, v in nodes.items()}, indent=1) + "\n")
    return path


@functools.lru_cache(maxsize=64)
def _node_config(items: tuple[tuple[str, Any], ...], env_file: str | None) -> NodeConfig:
    raw = dict(items)
    if SIMULATED not in raw:
        return NodeConfig.parse(raw, simulated=False)
    if not env_file:
        raise ConfigError(f"simulated node without a node configuration: run it with fedtune-sim (which sets "
                          f"{runtime.SIM_NODES.name})")
    mine = _simulation_nodes(env_file).get(str(raw[SIMULATED]))
    if mine is None:
        raise ConfigError(f"{env_file} has no configuration for partition {raw[SIMULATED]}")
    return NodeConfig.parse({**mine, SIMULATED: raw[SIMULATED]}, simulated=True)


def node_config(flower_node_config: Mapping[str, Any]) -> NodeConfig:
    """This node's configuration, parsed once per process."""
    return _node_config(tuple(sorted(flower_node_config.items())), runtime.sim_nodes_file())
