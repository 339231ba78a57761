"""The ClientApp against a curious or malicious server: only the wire contract's fields leave the node,
errors carry codes, and nothing the server sends opens a new budget or reaches the node's data split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedtune.client import app as client_app
from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.common.ledger.key import load_public_key
from fedtune.common.ledger.receipts import receipt_signature_problem
from fedtune.common.models.adapter import to_record
from fedtune.common.models.base import load_base
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.wire.contract import ERROR_CODES, RoundRequest, TrainReply, parse_reply
from tests.tiny import make_sentiment_frame

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # a ClientApp called in-process


@pytest.fixture()
def node(tmp_path: Path) -> dict[str, object]:
    frame = make_sentiment_frame(120, seed=5)
    frame.to_csv(tmp_path / "notes.csv", index=False)
    policy = NodePolicy(max_epsilon=4.0, dataset_id="ward-7", accountant="rdp", max_noise_multiplier=50.0)
    (tmp_path / "policy.toml").write_text(policy_toml(policy))
    return {"data-path": str(tmp_path / "notes.csv"), "state-dir": str(tmp_path / "state"),
            "policy": str(tmp_path / "policy.toml"), "labels": "neg,pos"}


def _request(model_dir: Path, **changes: object) -> RoundRequest:
    settings = RunSettings.from_config({"model-path": str(model_dir), "max-seq-len": 12, "batch-size": 32,
                                        "num-rounds": 2, "epsilon": 2.0})
    base = RoundRequest(1, "run-k", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                        settings.privacy)
    return dataclasses.replace(base, **changes)


def _send(node_config: dict, request: RoundRequest, model_dir: Path, *, run_id: int = 1,
          evaluate: bool = False) -> Message:
    model = build_model(load_base(str(model_dir)), len(request.labels), request.lora, torch.device("cpu"))
    content = RecordDict({"arrays": to_record(model), "request": request.to_record()})
    msg = Message(content, dst_node_id=7, message_type="evaluate" if evaluate else "train")
    context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    return (client_app.evaluate_local if evaluate else client_app.train)(msg, context)


def _fields(reply: Message) -> set[str]:
    c = reply.content
    return {f"{name}.{key}" for records in (c.config_records, c.metric_records) for name, rec in records.items()
            for key in rec} | {f"{name}.*" for name in c.array_records}


def test_a_trained_reply_holds_exactly_the_allow_listed_fields(node, tiny_model_dir) -> None:
    reply = _send(node, _request(tiny_model_dir), tiny_model_dir)
    allowed = {f"status.{k}" for k in TrainReply.STATUS_KEYS} | {f"metrics.{k}" for k in TrainReply.METRIC_KEYS}
    assert _fields(reply) == allowed | {"arrays.*"}  # no train-loss: the policy does not release it
    parsed = parse_reply(reply.content)
    assert isinstance(parsed, TrainReply) and parsed.status == "trained" and 0 < parsed.epsilon <= 4.0


def test_labels_other_than_the_declared_ones_are_refused_without_reading_a_row(node, tiny_model_dir) -> None:
    """The server cannot choose the node's columns or labels: other labels get a fixed refusal (the node's
    declaration decides it, not its rows), recorded in the ledger, with no row text in the reply."""
    reply = _send(node, _request(tiny_model_dir, labels=("a", "b")), tiny_model_dir)
    text = json.dumps({k: dict(v) for k, v in reply.content.config_records.items()})
    parsed = parse_reply(reply.content)
    assert parsed.code == "POLICY_LABELS" and not reply.content.array_records and parsed.num_examples == 0
    for row in make_sentiment_frame(120, seed=5)["text"]:
        assert row not in text
    ledger = [json.loads(line) for line in (Path(node["state-dir"]) / "ledger.jsonl").read_text().splitlines()]
    assert ledger[-1]["decision"] == "refused" and "this node declared 2" in ledger[-1]["reason"]
    assert ledger[-1]["fingerprint"] == ""  # refused before the rows were read


def test_replies_carry_the_nodes_signature_over_what_they_report(node, tiny_model_dir) -> None:
    """The server keeps (run, round, seq, head, status) as a receipt; the node signs it with its ledger key."""
    request = _request(tiny_model_dir)
    trained = parse_reply(_send(node, request, tiny_model_dir, run_id=3).content)
    public = load_public_key(Path(node["state-dir"]) / "ledger-signing.pub")  # created on the node's first round
    no_dp = _request(tiny_model_dir, privacy=dataclasses.replace(request.privacy, dp_mode="off"))
    refused = parse_reply(_send(node, no_dp, tiny_model_dir, run_id=3).content)
    assert isinstance(trained, TrainReply) and isinstance(refused, TrainReply)
    assert (trained.status, refused.status, refused.code) == ("trained", "refused", "POLICY_DP_REQUIRED")
    for reply in (trained, refused):
        values = {"run": "3", "round": 1, "seq": reply.ledger_seq, "head": reply.ledger_head, "status": reply.status}
        assert receipt_signature_problem(public, reply.node_sig, **values) is None
        for other in ({"run": "4"}, {"round": 2}, {"seq": reply.ledger_seq - 1}):
            assert "does not verify" in str(receipt_signature_problem(public, reply.node_sig, **(values | other)))


@pytest.mark.parametrize("change", [
    {"run_key": "another-seed-and-settings"},  # a new server seed changes the run key, nothing else
    {"labels": ("pos", "neg")},  # another class order
])
def test_server_chosen_values_do_not_open_a_new_budget(node, tiny_model_dir, change) -> None:
    first = parse_reply(_send(node, _request(tiny_model_dir), tiny_model_dir, run_id=1).content)
    second = parse_reply(_send(node, _request(tiny_model_dir, **change), tiny_model_dir, run_id=2).content)
    assert isinstance(first, TrainReply) and isinstance(second, TrainReply)
    assert second.epsilon > first.epsilon  # the same budget, spent further
    ledger = [json.loads(line) for line in (Path(node["state-dir"]) / "ledger.jsonl").read_text().splitlines()]
    assert {e["dataset"] for e in ledger} == {"ward-7"} and {e["rng"] for e in ledger} == {"secrets"}
    while second.status == "trained":  # keep asking: the node stops at its own budget
        second = parse_reply(_send(node, _request(tiny_model_dir, **change), tiny_model_dir, run_id=9).content)
    assert second.code in ("BUDGET_EXHAUSTED", "POLICY_MAX_NOISE") and second.epsilon <= 4.0


@pytest.mark.parametrize(("mutate", "code"), [
    (lambda r: dict(r.to_record()) | {"seed": 42}, "BAD_REQUEST"),  # a field outside the contract
    (lambda r: {k: v for k, v in dict(r.to_record()).items() if k != "epsilon"}, "BAD_REQUEST"),
    (lambda r: dict(r.to_record()) | {"batch-size": "128"}, "BAD_REQUEST"),  # no string-to-number parsing
    (lambda r: dict(r.to_record()) | {"max-seq-len": 10**9}, "BAD_REQUEST"),  # beyond the node's limits
    (lambda r: dict(r.to_record()) | {"model-path": "/nonexistent/model"}, "MODEL"),
])
def test_bad_requests_get_a_code_only(node, tiny_model_dir, mutate, code) -> None:
    from flwr.app import ConfigRecord

    request = _request(tiny_model_dir)
    model = build_model(load_base(str(tiny_model_dir)), 2, request.lora, torch.device("cpu"))
    msg = Message(RecordDict({"arrays": to_record(model), "request": ConfigRecord(dict(mutate(request)))}),
                  dst_node_id=7, message_type="train")
    reply = client_app.train(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))
    status = dict(reply.content.config_records["status"])
    assert status["code"] == code and status["message"].startswith(ERROR_CODES[code])
    assert "/nonexistent" not in json.dumps(status)


def test_local_evaluation_is_declined_unless_the_policy_releases_it(node, tiny_model_dir) -> None:
    reply = _send(node, _request(tiny_model_dir), tiny_model_dir, evaluate=True)
    assert _fields(reply) == {"status.wire-version", "status.status"}
    policy_path = Path(str(node["policy"]))
    policy_path.write_text(policy_toml(NodePolicy(max_epsilon=4.0, dataset_id="ward-7", release_local_eval=True)))
    reply = _send(node, _request(tiny_model_dir), tiny_model_dir, evaluate=True)
    assert parse_reply(reply.content, evaluation=True).status == "evaluated"
    seed = (Path(str(node["state-dir"])) / "local-split.seed").read_text()
    assert int(seed) > 0  # the node's own secret split seed, kept for the next rounds
