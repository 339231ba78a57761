"""Typed outcomes write the rows metrics.jsonl and checkpoints have always held, and read them back: a checkpoint
written before outcomes were typed resumes, and its rows are saved again unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.tasks.result import EvalResult
from fedtune.server.checkpoint import LATEST, CheckpointStore
from fedtune.server.outcome import EvalOutcome, NodeOutcome, train_loss, weighted_mean
from fedtune.server.round_line import RoundLine

KEY = "ed25519:56475aa75463474c0285df5dbf2bcab7"
# Rows as the ServerApp wrote them before outcomes were typed (one of each kind), copied from its output.
ROWS = [
    '{"node-id": 1, "status": "trained", "code": "", "num-examples": 100, "epsilon": 1.5, "epsilon-round": 0.75, '
    '"epsilon-budget": 8.0, "epsilon-remaining": 6.5, "noise-multiplier": 1.1, "exhausted": false, "ledger-key": '
    f'"{KEY}", "ledger-seq": 2, "ledger-head": "{"01" * 32}", "node-sig": "9rW9ol7xIdb9XJYZ1T92sIbbpEqDl6dOyoKftMKo5Z'
    'Tayqj8Y+mzyxO0xushKTekIEtEcrTOfcTGeAS8NnT/Dg==", "node": "simulation:client-1", "train-loss": 0.7, "run": '
    '"4242", "bytes": 136, "weight": 100.0}',
    '{"node-id": 3, "status": "trained", "code": "", "num-examples": 80, "epsilon": 3.0, "epsilon-round": 1.5, '
    '"epsilon-budget": 8.0, "epsilon-remaining": 5.0, "noise-multiplier": 1.1, "exhausted": false, "ledger-key": '
    f'"{KEY}", "ledger-seq": 4, "ledger-head": "{"03" * 32}", "node-sig": "P9VcBYrkyCXA+3K3jBsv+eccSkQQs3m0Q125+ORtIs'
    'ZWVbgtJIZPxj6F6g1jKk7NIINQWmJpCZ152sV6yd57CA==", "node": "simulation:client-3", "run": "4242", "bytes": 136, '
    '"weight": 80.0}',
    '{"node-id": 4, "status": "rejected", "code": "BAD_UPDATE", "num-examples": 50, "epsilon": 1.0, "epsilon-round": '
    '0.5, "epsilon-budget": 8.0, "epsilon-remaining": 7.0, "noise-multiplier": 1.1, "exhausted": false, '
    f'"ledger-key": "{KEY}", "ledger-seq": 5, "ledger-head": "{"04" * 32}", "node-sig": "Nfc7XS6I70FzAY29PvpiGu9upF1'
    '0SrLaA9DS1jpogigJPsX3W0kwNDLKrkT6v92Y+ZyyrRvtJzttA4vjzmtADQ==", "node": "simulation:client-4", "train-loss": '
    '0.1, "run": "4242"}',
    '{"node-id": 8, "status": "refused", "code": "BUDGET_EXHAUSTED", "num-examples": 10, "epsilon": Infinity, '
    '"epsilon-round": 0.0, "epsilon-budget": 8.0, "epsilon-remaining": -Infinity, "noise-multiplier": 0.0, '
    f'"exhausted": true, "ledger-key": "{KEY}", "ledger-seq": 9, "ledger-head": "{"ef" * 32}", "node-sig": "rjAnCnCn'
    'frY4JVgudYqJxaLaPUR1h9g8R9n+c6XY50d9unuXsoPogy/ykFg+ZXAsMUDlm2+TeKQcW/Jkv28OAw==", "node": "", "run": "4242"}',
    '{"node-id": 5, "status": "error", "code": "DATA_LABELS"}',
    '{"node-id": 7, "status": "rejected", "code": "MALFORMED"}',
    '{"node-id": 6, "status": "error", "code": "FLOWER_MESSAGE_UNAVAILABLE"}',
    # a central run's row: no run id, no bytes, no weight
    '{"node-id": 0, "status": "trained", "code": "", "num-examples": 459, "epsilon": 2.392277119948397, '
    '"epsilon-round": 2.392277119948397, "epsilon-budget": 3.0, "epsilon-remaining": 0.607722880051603, '
    f'"noise-multiplier": 0.9883858388429665, "exhausted": true, "ledger-key": "{KEY}", "ledger-seq": 2, '
    f'"ledger-head": "{"67" * 32}", "node-sig": "yawbJr9hLl5Y6i4WJhzVvig0v8xOXnlx0j7RJ3YIXQenmlPZQe5Q1yq0mBWWEUGhQXr'
    'gIHV7m15LruN4Xs81CA==", "node": "simulation:client-0", "train-loss": 1.2491728045867532}',
]
EVAL_ROWS = ['{"node-id": 2, "num-examples": 12, "eval-loss": 0.7, "eval-accuracy": 0.2}',
             '{"node-id": 4, "num-examples": 14, "eval-loss": 0.9, "eval-accuracy": 0.4}']


@pytest.mark.parametrize("text", ROWS + EVAL_ROWS)
def test_a_row_reads_back_and_writes_the_same_json(text: str) -> None:
    row = json.loads(text)
    kind = EvalOutcome if "eval-loss" in row else NodeOutcome
    assert json.dumps(kind.from_row(row).to_row()) == text


def test_outcomes_keep_the_reply_and_what_the_server_added() -> None:
    trained, _, rejected, refused, error = (NodeOutcome.from_row(json.loads(t)) for t in ROWS[:5])
    assert trained.reply is not None and trained.reply.status == "trained" and trained.reply.train_loss == 0.7
    assert (trained.received_bytes, trained.weight, trained.run) == (136, 100.0, "4242")
    assert rejected.reply is not None and rejected.reply.status == "trained"  # the node's answer, rejected here
    assert refused.reply is not None and refused.reply.code == "BUDGET_EXHAUSTED" and refused.weight is None
    assert error.reply is None and error.code == "DATA_LABELS"
    with pytest.raises(ValueError, match="status must be one of"):
        NodeOutcome(1, "lost", "")  # type: ignore[arg-type]


def test_a_round_line_holds_every_row_and_the_weighted_aggregates() -> None:
    outcomes = [NodeOutcome.from_row(json.loads(t)) for t in ROWS[:7]]
    evaluations = [EvalOutcome.from_row(json.loads(t)) for t in EVAL_ROWS]
    result = EvalResult(loss=0.6, accuracy=0.7, num_examples=40, confusion=[[15, 5], [3, 17]], group_confusion={})
    line = RoundLine(1, outcomes, evaluations, result, ["neg", "pos"]).to_row()
    assert list(line) == ["round", "accuracy", "loss", "train-loss", "bytes-received", "epsilon-max", "epsilon-mean",
                          "client-accuracy", "clients", "num-examples", "labels", "confusion", "per-label"]
    assert [json.dumps(row) for row in line["clients"]] == ROWS[:7]
    assert line["train-loss"] == 0.7  # only trained nodes count (the rejected node's 0.1 does not)
    assert line["bytes-received"] == 272 and line["epsilon-max"] == float("inf")
    assert line["client-accuracy"] == pytest.approx((12 * 0.2 + 14 * 0.4) / 26)
    assert math.isnan(train_loss([]))  # no trained node
    assert weighted_mean([(1.0, 1), (3.0, 3)]) == 2.5


def test_a_checkpoint_written_before_typed_outcomes_resumes_and_is_saved_unchanged(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "round-0001").mkdir(parents=True)
    np.savez(old / "round-0001" / "adapter.npz", w=np.zeros(2, dtype=np.float32))
    state = {"format": 1, "round": 1, "run-key": "k", "first-started": 5.0, "saved": 6.0,
             "train-rows": {"1": [json.loads(t) for t in ROWS]},
             "eval-rows": {"1": [json.loads(t) for t in EVAL_ROWS]}, "metrics": [{"round": 0}, {"round": 1}]}
    (old / "round-0001" / "state.json").write_text(json.dumps(state))
    (old / LATEST).write_text("round-0001\n")
    ckpt = CheckpointStore(old).resumable("k", 3)
    assert ckpt is not None and [o.node_id for o in ckpt.outcomes[1]] == [1, 3, 4, 8, 5, 7, 6, 0]
    CheckpointStore(tmp_path / "new").save(ckpt)
    again = json.loads((tmp_path / "new" / "round-0001" / "state.json").read_text())
    assert json.dumps({k: v for k, v in again.items() if k != "saved"}) == \
        json.dumps({k: v for k, v in state.items() if k != "saved"})
