"""Per-round server checkpoints and resuming a run from the last one.

Flower has no server-side resume, so the ServerApp saves, after every round's
evaluation: the global adapter, the round number, every node's outcome of every
round so far (as the rows of metrics.jsonl: :meth:`NodeOutcome.to_row`) and the
metrics lines so far. A restarted run loads the newest
checkpoint and runs only the remaining rounds, with the true round numbers
(clients plan noise and seed their RNG from them), so the final adapter and
metrics equal an uninterrupted run's whenever the clients reply the same.

Layout (every step atomic: a round directory is complete or absent)::

    CHECKPOINT_DIR/round-0001/{adapter.npz, state.json}
    CHECKPOINT_DIR/LATEST          -> "round-0001"

Only the LoRA tensors are stored (megabytes at most); the newest ``KEEP``
checkpoints are kept. A checkpoint is only resumed by a run with the same
settings (``run-key``); anything else is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.common.durable import fsync_dir
from fedtune.common.errors import ConfigError
from fedtune.common.wire.arrays import Arrays
from fedtune.server.outcome import EvalOutcome, NodeOutcome, rows_by_round

LATEST = "LATEST"
KEEP = 3
FORMAT_VERSION = 1
# Settings that may differ between the interrupted and the resumed run.
IGNORED_FOR_KEY = ("results-dir",)


def run_key(config: Mapping[str, Any]) -> str:
    """Identifies "the same run": a hash of its settings (results-dir excluded)."""
    stable = {k: config[k] for k in sorted(config) if k not in IGNORED_FOR_KEY}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """Everything the ServerApp needs to continue after ``server_round``."""

    server_round: int
    run_key: str
    arrays: Arrays  # the global adapter after this round
    outcomes: Mapping[int, Sequence[NodeOutcome]] = field(default_factory=dict)  # every training reply, per round
    evaluations: Mapping[int, Sequence[EvalOutcome]] = field(default_factory=dict)  # local evaluations, per round
    metrics_lines: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl so far
    first_started: float = 0.0  # wall-clock time the run was first started (for the ledger/audit trail)


def _outcomes(raw: Mapping[str, Any]) -> dict[int, tuple[NodeOutcome, ...]]:
    return {int(k): tuple(NodeOutcome.from_row(row) for row in v) for k, v in raw.items()}


def _evaluations(raw: Mapping[str, Any]) -> dict[int, tuple[EvalOutcome, ...]]:
    return {int(k): tuple(EvalOutcome.from_row(row) for row in v) for k, v in raw.items()}


class CheckpointStore:
    """Saves and loads :class:`Checkpoint` s under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, ckpt: Checkpoint) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"round-{ckpt.server_round:04d}"
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "adapter.npz", "wb") as fh:
            np.savez(fh, **ckpt.arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds against allow_pickle
            fh.flush()
            os.fsync(fh.fileno())
        state = {
            "format": FORMAT_VERSION, "round": ckpt.server_round, "run-key": ckpt.run_key,
            "first-started": ckpt.first_started, "saved": time.time(),
            "train-rows": rows_by_round(ckpt.outcomes), "eval-rows": rows_by_round(ckpt.evaluations),
            "metrics": ckpt.metrics_lines,
        }
        with open(tmp / "state.json", "w") as fh:
            json.dump(state, fh, default=_jsonable)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = self.root / f".{LATEST}.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, self.root / LATEST)
        fsync_dir(self.root)
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        rounds = sorted(p for p in self.root.glob("round-*") if p.is_dir())
        for old in rounds[:-KEEP]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None when there is none."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        try:
            state = json.loads((path / "state.json").read_text())
            with np.load(path / "adapter.npz") as npz:
                arrays = {k: npz[k] for k in npz.files}
            return Checkpoint(
                server_round=int(state["round"]), run_key=str(state["run-key"]), arrays=arrays,
                outcomes=_outcomes(state["train-rows"]), evaluations=_evaluations(state["eval-rows"]),
                metrics_lines=list(state["metrics"]), first_started=float(state.get("first-started", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"checkpoint {path} is unreadable ({err}); move {self.root} away to start afresh, "
                              "or restore it from backup") from err

    def resumable(self, key: str, num_rounds: int) -> Checkpoint | None:
        """The checkpoint to continue from, after checking it belongs to this run."""
        ckpt = self.latest()
        if ckpt is None:
            return None
        if ckpt.run_key != key:
            raise ConfigError(
                f"checkpoint {self.root} belongs to a run with other settings (run-key {ckpt.run_key}, "
                f"this run {key}); use another checkpoint directory or move this one away to start afresh"
            )
        if ckpt.server_round > num_rounds:
            raise ConfigError(f"checkpoint {self.root} is at round {ckpt.server_round} but num-rounds is "
                              f"{num_rounds}")
        return ckpt


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


class RoundOffset(Strategy):
    """Runs ``inner`` for the remaining rounds with their true numbers (``offset`` + 1, ...).

    Flower's ``Strategy.start`` always counts from 1; clients plan noise and seed
    from the round number, so a resumed round must carry its real number.
    """

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()
