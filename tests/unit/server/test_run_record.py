"""The server's run record: a receipt for every accepted reply, carrying the node's signature and the run id."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.key import load_or_create_key
from fedtune.common.ledger.receipts import RECORD_FORMAT, read_run_record
from fedtune.common.wire.arrays import arrays_to_record
from fedtune.server.outcome import NodeOutcome
from fedtune.server.run_record import receipts, write_record
from fedtune.server.strategy import AdapterFedAvg
from tests.unit.server.fakes import LEDGER_KEY, NODE_KEY, REQUEST_TEMPLATE, RUN_ID, refused, shifted, trained
from tests.unit.server.test_strategy_budget import ScriptedGrid


@pytest.fixture(autouse=True)
def _task_identity() -> Iterable[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


Outcomes = dict[int, tuple[NodeOutcome, ...]]


@pytest.fixture
def outcomes() -> Outcomes:
    """Round 1: node 1 trained, node 2 refused, node 3 trained but sent a NaN update (rejected, BAD_UPDATE)."""
    grid = ScriptedGrid({1: lambda m: trained(m, shifted(m, 1.0)), 2: lambda m: refused(m),
                         3: lambda m: trained(m, {"w": np.full(2, np.nan, dtype=np.float32)}, seq=5)})
    strategy = AdapterFedAvg(REQUEST_TEMPLATE, run_id=RUN_ID, fraction_train=1.0, fraction_evaluate=0.0,
                             min_train_nodes=1, min_available_nodes=3)
    strategy.start(grid=grid, initial_arrays=arrays_to_record({"w": np.zeros(2, dtype=np.float32)}), num_rounds=1)
    return strategy.outcomes


def test_every_accepted_reply_makes_a_receipt_the_node_signed(outcomes: Outcomes, tmp_path) -> None:
    made = receipts(outcomes)
    assert sorted((r.node, r.status) for r in made) == [("1", "trained"), ("2", "refused"), ("3", "rejected")]
    assert all(r.run == RUN_ID and r.ledger_key == LEDGER_KEY for r in made)
    # A rejected reply was a trained one: the node's signature covers "trained".
    assert [r.node_signature_problem(NODE_KEY.public_key()) for r in made] == [None, None, None]
    key = load_or_create_key(tmp_path / "server.key")
    write_record(tmp_path / "results", RUN_ID, "k", outcomes, key)
    check = read_run_record(tmp_path / "results", key.public_key())
    assert check.problems == [] and check.record is not None
    assert check.record.format == RECORD_FORMAT and check.record.receipts == tuple(made)


def test_a_row_that_cannot_make_a_receipt_is_an_error_not_skipped(outcomes: Outcomes) -> None:
    first = outcomes[1][0]
    assert first.reply is not None
    bad = dataclasses.replace(first, reply=dataclasses.replace(first.reply, ledger_head="xyz"))
    with pytest.raises(PrivacyError, match="field 'head' must be 64 hex digits"):
        receipts({1: (bad, *outcomes[1][1:])})


def test_rows_from_an_older_checkpoint_are_logged(outcomes: Outcomes, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before nodes signed their replies: its rows have no node-sig and no run."""
    rows = [o.to_row() for o in outcomes[1]]
    for row in rows:
        row.pop("node-sig", None)
        row.pop("run", None)
    older = {1: tuple(NodeOutcome.from_row(row) for row in rows)}
    assert [o.to_row() for o in older[1]] == rows  # read back as written
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        assert receipts(older) == []
    assert caplog.text.count("recorded before nodes signed their replies") == 3
