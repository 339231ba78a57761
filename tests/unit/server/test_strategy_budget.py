"""AdapterFedAvg: refusing nodes leave the sample, too few left or too few connected ends the run cleanly,
and every reply is held to the wire contract (a node's free text never reaches the server's records)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.wire.arrays import arrays_to_record
from fedtune.common.wire.contract import ErrorReply
from fedtune.server.strategy import AdapterFedAvg
from tests.unit.server.fakes import REQUEST_TEMPLATE, RUN_ID, evaluated, raw, refused, server_round, shifted, trained


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class BudgetGrid:
    """Nodes that train until the round given in ``refuse_from``, then refuse with a code."""

    def __init__(self, refuse_from: dict[int, int], connected: list[int] | None = None) -> None:
        self.refuse_from = refuse_from
        self.connected = sorted(refuse_from) if connected is None else connected
        self.asked: dict[int, list[int]] = {}

    def get_node_ids(self) -> list[int]:
        return self.connected

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, r = msg.metadata.dst_node_id, server_round(msg)
            if not msg.metadata.message_type.startswith("train"):
                replies.append(evaluated(msg))
                continue
            self.asked.setdefault(r, []).append(node)
            replies.append(refused(msg) if r >= self.refuse_from[node] else trained(msg, shifted(msg, 1.0)))
        return replies


class ScriptedGrid(BudgetGrid):
    """Round 1 only: each node answers with the reply its function builds."""

    def __init__(self, answers: dict[int, object]) -> None:
        super().__init__({n: 99 for n in answers})
        self.answers = answers

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        return [self.answers[m.metadata.dst_node_id](m) if m.metadata.message_type.startswith("train")
                else evaluated(m) for m in messages]


def _start(grid: BudgetGrid, rounds: int, min_nodes: int, wait: float = 600.0) -> tuple[AdapterFedAvg, list[int]]:
    strategy = AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, node_wait_timeout=wait, fraction_train=1.0,
                             fraction_evaluate=1.0, min_train_nodes=min_nodes, min_evaluate_nodes=1,
                             min_available_nodes=min_nodes)
    evaluated_rounds: list[int] = []

    def evaluate_fn(r: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated_rounds.append(r)
        return MetricRecord({"accuracy": 0.5})

    strategy.start(grid=grid, initial_arrays=arrays_to_record({"w": np.zeros(2, dtype=np.float32)}),
                   num_rounds=rounds, evaluate_fn=evaluate_fn)
    return strategy, evaluated_rounds


def test_refusing_node_is_excluded_and_the_others_finish() -> None:
    grid = BudgetGrid({1: 2, 2: 99, 3: 99})  # node 1 refuses from round 2 on
    strategy, evaluated_rounds = _start(grid, rounds=4, min_nodes=2)
    asked = {r: sorted(nodes) for r, nodes in grid.asked.items()}
    assert asked == {1: [1, 2, 3], 2: [1, 2, 3], 3: [2, 3], 4: [2, 3]}
    assert strategy.stop_code is None and evaluated_rounds == [0, 1, 2, 3, 4]
    refused_rows = [o.to_row() for o in strategy.outcomes[2] if o.status == "refused"]
    assert len(refused_rows) == 1 and refused_rows[0]["code"] == "BUDGET_EXHAUSTED"
    assert refused_rows[0]["ledger-seq"] == 2 and refused_rows[0]["epsilon-remaining"] == pytest.approx(0.1)
    assert "refused in round 2 (BUDGET_EXHAUSTED)" in strategy.excluded[1]


def test_run_ends_cleanly_when_too_few_nodes_can_train() -> None:
    grid = BudgetGrid({1: 2, 2: 3, 3: 99})
    strategy, evaluated_rounds = _start(grid, rounds=5, min_nodes=2)
    assert sorted(grid.asked) == [1, 2, 3]  # rounds 4 and 5 send no work at all
    assert strategy.stop_code == "budget" and strategy.stop_reason is not None
    assert strategy.stop_reason.startswith("stopped before round 4: 1 of 3 nodes can still train, the run needs 2")
    assert "node 1: refused in round 2" in strategy.stop_reason
    assert evaluated_rounds == [0, 1, 2, 3, 4, 5]  # the run still completes (no exception, no hang)


def test_too_few_connected_nodes_stop_at_the_deadline_instead_of_waiting_forever() -> None:
    grid = BudgetGrid({1: 99, 2: 99}, connected=[1])
    strategy, evaluated_rounds = _start(grid, rounds=3, min_nodes=2, wait=0.5)
    assert grid.asked == {} and strategy.stop_code == "nodes"
    assert "fewer than 2 nodes connected within 0.5s" in (strategy.stop_reason or "")
    assert evaluated_rounds == [0, 1, 2, 3]


ROW_TEXT = "Mrs Jane Doe, 12 Elm St, diagnosed with"


def _with_key(msg: Message, key: str, value: object) -> Message:
    good = trained(msg, shifted(msg, 1.0))
    content = good.content
    content.metric_records["metrics"][key] = value
    return raw(msg, content)


@pytest.mark.parametrize(("answer", "status", "code"), [
    (lambda m: trained(m, shifted(m, 1.0)), "trained", ""),
    (lambda m: raw(m, ErrorReply("DATA_LABELS").to_content()), "error", "DATA_LABELS"),
    # a node cannot smuggle text through an error: unknown codes become INTERNAL, messages are dropped
    (lambda m: raw(m, RecordDict({"status": ConfigRecord({"status": "error", "code": ROW_TEXT,
                                                          "message": ROW_TEXT})})), "error", "INTERNAL"),
    (lambda m: Message(Error(code=3, reason=ROW_TEXT), reply_to=m), "error", "FLOWER_MESSAGE_UNAVAILABLE"),
    (lambda m: _with_key(m, "note", 1.0), "rejected", "MALFORMED"),  # a field outside the contract
    (lambda m: _with_key(m, "num-examples", 0), "rejected", "MALFORMED"),
    (lambda m: _with_key(m, "epsilon", math.nan), "rejected", "MALFORMED"),
    (lambda m: trained(m, {"w": np.full(2, np.nan, dtype=np.float32)}), "rejected", "BAD_UPDATE"),
    (lambda m: trained(m, {"w": np.zeros(3, dtype=np.float32)}), "rejected", "BAD_UPDATE"),
    (lambda m: raw(m, RecordDict({"metrics": MetricRecord({"num-examples": 10})})), "rejected", "MALFORMED"),
])
def test_every_reply_is_held_to_the_contract(answer, status: str, code: str) -> None:
    grid = ScriptedGrid({1: lambda m: trained(m, shifted(m, 1.0)), 2: answer})
    strategy, _ = _start(grid, rounds=1, min_nodes=1)
    row = next(o.to_row() for o in strategy.outcomes[1] if o.node_id == 2)
    assert (row["status"], row["code"]) == (status, code)
    assert ROW_TEXT not in json.dumps({r: [o.to_row() for o in outcomes] for r, outcomes in strategy.outcomes.items()})
    if status == "trained":
        assert set(row) >= {"epsilon", "ledger-key", "ledger-seq", "ledger-head", "bytes"}
    elif code != "BAD_UPDATE":  # a well-formed reply with an unusable update keeps its contract fields
        assert set(row) <= {"node-id", "status", "code"}


def test_a_reply_whose_ids_would_not_make_a_receipt_is_rejected_and_not_averaged() -> None:
    """The wire uses the ledger's validators: a 16-hex key id (not ``ed25519:`` + 32 hex) is MALFORMED."""
    grid = ScriptedGrid({1: lambda m: trained(m, shifted(m, 1.0)), 2: lambda m: trained(m, shifted(m, 3.0)),
                         3: lambda m: trained(m, shifted(m, 100.0), ledger_key="ed25519:" + "ab" * 8)})
    strategy = AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, fraction_train=1.0, fraction_evaluate=0.0,
                             min_train_nodes=1, min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=arrays_to_record({"w": np.zeros(2, dtype=np.float32)}),
                            num_rounds=1)
    rows = {o.node_id: o.to_row() for o in strategy.outcomes[1]}
    assert (rows[3]["status"], rows[3]["code"]) == ("rejected", "MALFORMED") and "ledger-key" not in rows[3]
    assert np.allclose(result.arrays.to_numpy_ndarrays()[0], 2.0)  # the mean of nodes 1 and 2 only
    assert all(rows[n]["node-sig"] and rows[n]["run"] == RUN_ID for n in (1, 2))
