"""Server checkpoints: atomic round directories, run-key checks, and a resume equal to an uninterrupted run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.errors import ConfigError
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.server.checkpoint import LATEST, Checkpoint, CheckpointStore, RoundOffset, run_key
from fedtune.server.outcome import NodeOutcome
from fedtune.server.strategy import AdapterFedAvg
from tests.unit.server.fakes import REQUEST_TEMPLATE, RUN_ID, evaluated, server_round, shifted, trained

ARRAYS = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora_B": np.zeros((3, 2), dtype=np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower's Message() reads the process' task identity (set by flwr-serverapp in a real run)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _ckpt(server_round: int, key: str = "k") -> Checkpoint:
    return Checkpoint(server_round=server_round, run_key=key, arrays={k: v + server_round for k, v in ARRAYS.items()},
                      outcomes={server_round: [NodeOutcome(7, "trained", "", weight=1.5)]},
                      metrics_lines=[{"round": r} for r in range(server_round + 1)], first_started=123.0)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest() is None
    store.save(_ckpt(1))
    store.save(_ckpt(2))
    got = store.latest()
    assert got is not None and got.server_round == 2 and got.first_started == 123.0
    np.testing.assert_array_equal(got.arrays["lora_A"], ARRAYS["lora_A"] + 2)
    assert got.outcomes == {2: (NodeOutcome(7, "trained", "", weight=1.5),)}
    assert [m["round"] for m in got.metrics_lines] == [0, 1, 2]
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "round-0002"


def test_only_the_newest_checkpoints_are_kept_and_no_temp_dirs_remain(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for r in range(6):
        store.save(_ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "round-0003", "round-0004", "round-0005"]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1, key=run_key({"num-rounds": 3, "epsilon": 8.0})))
    assert store.resumable(run_key({"num-rounds": 3, "epsilon": 8.0, "results-dir": "elsewhere"}), 3) is not None
    with pytest.raises(ConfigError, match="other settings"):
        store.resumable(run_key({"num-rounds": 3, "epsilon": 4.0}), 3)
    with pytest.raises(ConfigError, match="num-rounds is 0"):
        store.resumable(run_key({"num-rounds": 3, "epsilon": 8.0}), 0)


def test_a_corrupt_checkpoint_is_reported_not_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))
    (tmp_path / "round-0001" / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        store.latest()


class FakeGrid:
    """Two nodes whose 'training' is a deterministic function of (round, node, global arrays)."""

    def __init__(self) -> None:
        self.rounds_seen: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [11, 22]

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            r, node = server_round(msg), msg.metadata.dst_node_id
            if msg.metadata.message_type.startswith("train"):
                self.rounds_seen.append(r)
                replies.append(trained(msg, shifted(msg, 0.01 * r * node), examples=node))
            else:
                replies.append(evaluated(msg, node))
        return replies


def _strategy() -> AdapterFedAvg:
    return AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2,
                         min_evaluate_nodes=2, min_available_nodes=2)


def _run(strategy: AdapterFedAvg, grid: FakeGrid, initial: ArrayRecord, rounds: int, offset: int,
         on_round: list[tuple[int, ArrayRecord]]) -> ArrayRecord:
    def evaluate_fn(r: int, arrays: ArrayRecord) -> MetricRecord | None:
        on_round.append((r + offset, arrays))
        return None

    result = RoundOffset(strategy, offset).start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                                                 evaluate_fn=evaluate_fn)
    return result.arrays


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    initial = arrays_to_record(ARRAYS)
    straight_grid, seen = FakeGrid(), []
    straight = _run(_strategy(), straight_grid, initial, 3, 0, seen)

    # Interrupted after round 1: checkpoint, then a fresh strategy resumes for rounds 2 and 3.
    first, evaluated = _strategy(), []
    _run(first, FakeGrid(), initial, 1, 0, evaluated)
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(server_round=1, run_key="k", arrays=record_to_arrays(evaluated[-1][1]),
                          outcomes=first.outcomes))
    ckpt = store.resumable("k", 3)
    assert ckpt is not None
    second, resumed_grid = _strategy(), FakeGrid()
    second.restore(ckpt.outcomes, ckpt.evaluations)
    resumed = _run(second, resumed_grid, arrays_to_record(ckpt.arrays), 3 - ckpt.server_round, ckpt.server_round, [])

    assert resumed_grid.rounds_seen == [2, 2, 3, 3]  # the true round numbers reach the nodes
    assert sorted(second.outcomes) == [1, 2, 3]
    for key, value in record_to_arrays(straight).items():
        np.testing.assert_array_equal(record_to_arrays(resumed)[key], value)
