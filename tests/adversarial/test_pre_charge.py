"""Everything a node says before its charge is a function of the request and its own configuration.

The curious server's free queries on the rows, each closed: labels that probe for a label value no declared
class has, a task or model that makes the node parse or encode its rows differently, a model path that probes
the node's filesystem, weights that overflow in a chosen row's forward pass. Each test runs the same request
against two nodes whose datasets differ in one row and asserts the replies are the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.common.wire.contract import TrainReply, parse_reply
from tests.adversarial.node import (
    LABELS,
    Node,
    adapter,
    make_node,
    neighbours,
    ner_adapter,
    public,
    request,
    send,
    with_values,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # a ClientApp called in-process
POLICY = NodePolicy(max_epsilon=4.0, dataset_id="ward-7", accountant="rdp", max_noise_multiplier=50.0)


@pytest.fixture()
def pair(tmp_path: Path):
    """Two nodes: one holds a row labelled HIV+ (outside the declared neg/pos), the other does not."""
    with_target, without = neighbours(target_label="HIV+")
    return make_node(tmp_path / "a", with_target, POLICY), make_node(tmp_path / "b", without, POLICY)


def test_labels_that_probe_for_a_row_get_the_same_refusal_from_both(pair, tiny_model_dir) -> None:
    """On the old node, labels=neg,pos answered DATA_LABELS exactly when some row carried another label."""
    a, b = pair
    for labels in (("neg", "pos", "HIV+"), ("HIV+", "neg"), ("neg", "other")):
        req = request(tiny_model_dir, labels=labels)
        replies = [send(n, req, adapter(tiny_model_dir, req, labels=len(labels))) for n in (a, b)]
        assert public(replies[0]) == public(replies[1])
        assert parse_reply(replies[0].content).code == "POLICY_LABELS"
    assert [e["fingerprint"] for e in a.ledger() if e["kind"] == "round"] == ["", "", ""]  # no row was read


def test_the_declared_labels_train_both_and_the_odd_row_stays_out(pair, tiny_model_dir, caplog) -> None:
    a, b = pair
    req = request(tiny_model_dir, labels=("pos", "neg"))  # the node's labels in another order
    first, second = (parse_reply(send(n, req, adapter(tiny_model_dir, req)).content) for n in (a, b))
    assert isinstance(first, TrainReply) and first.status == second.status == "trained"
    assert first.num_examples == second.num_examples - 1  # the HIV+ row is left out: N is the disclosed leak
    assert "HIV+" in caplog.text and "left out" in caplog.text  # named in the node's own log only


@pytest.mark.parametrize("task", ["ner", "sft"])
def test_another_task_is_refused_before_the_rows_are_parsed(pair, tiny_model_dir, task) -> None:
    """Parsing a CSV as CoNLL or JSONL would fail or not depending on its rows: a task the node did not
    declare is refused first."""
    a, b = pair
    settings_model = dataclasses.replace(request(tiny_model_dir).model, task=task)
    req = request(tiny_model_dir, model=settings_model, labels=() if task == "sft" else LABELS)
    replies = [send(n, req, adapter(tiny_model_dir, request(tiny_model_dir))) for n in (a, b)]
    assert public(replies[0]) == public(replies[1])
    assert parse_reply(replies[0].content).code == "POLICY_TASK"


def test_a_model_outside_the_allow_list_is_refused_whether_or_not_it_exists(tmp_path, tiny_model_dir) -> None:
    """Checked before the model is loaded: the refusal does not say which directories exist on the node."""
    frame, _ = neighbours()
    policy = dataclasses.replace(POLICY, allowed_models=("embedded",))
    replies = []
    for i, path in enumerate((str(tiny_model_dir), "/nonexistent/model")):
        req = request(tiny_model_dir, model=dataclasses.replace(request(tiny_model_dir).model, model_path=path))
        replies.append(send(make_node(tmp_path / str(i), frame, policy), req, adapter(tiny_model_dir, req)))
    assert public(replies[0]) == public(replies[1])
    assert parse_reply(replies[0].content).code == "POLICY_MODEL"


@pytest.mark.parametrize(("value", "why"), [
    (1e39, "finite as float64, inf once cast to the model's float32"),
    (1e8, "finite everywhere, far above any trained adapter value"),
    (float("nan"), "not a number"),
])
def test_overflowing_weights_get_the_same_error_before_any_charge(pair, tiny_model_dir, value, why) -> None:
    """Weights that overflow the forward pass of rows near a chosen direction would make training fail exactly
    when such a row was sampled. They are checked after the cast and against a bound, before the charge."""
    a, b = pair
    req = request(tiny_model_dir)
    arrays = with_values(adapter(tiny_model_dir, req), "head", value)
    replies = [send(n, req, arrays) for n in (a, b)]
    assert public(replies[0]) == public(replies[1]), why
    assert dict(replies[0].content.config_records["status"])["code"] == "BAD_REQUEST"
    assert not a.ledger() and not b.ledger()  # nothing charged, nothing recorded


def test_a_sequence_length_above_the_policy_or_the_model_is_refused_before_the_rows(pair, tiny_model_dir) -> None:
    a, b = pair
    for node in (a, b):
        Path(node.config["policy"]).write_text(policy_toml(dataclasses.replace(POLICY, max_seq_len=8)))
    req = request(tiny_model_dir)  # max-seq-len 12 > 8
    replies = [send(n, req, adapter(tiny_model_dir, req)) for n in (a, b)]
    assert public(replies[0]) == public(replies[1]) and parse_reply(replies[0].content).code == "POLICY_SEQ_LEN"
    for node in (a, b):
        Path(node.config["policy"]).write_text(policy_toml(POLICY))
    too_long = request(tiny_model_dir, model=dataclasses.replace(req.model, max_seq_len=4096))  # context: 64
    replies = [send(n, too_long, adapter(tiny_model_dir, too_long)) for n in (a, b)]
    assert public(replies[0]) == public(replies[1])
    assert dict(replies[0].content.config_records["status"])["code"] == "BAD_REQUEST"


def test_a_fixed_shape_node_trains_every_part_at_the_requested_length(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """The timing channel of dynamic padding: with the policy's fixed-shape, the shapes the model sees (and so a
    round's time and memory) depend on the request and the Poisson batch sizes, not on row lengths."""
    from fedtune.client import round as node_round

    seen: list[int] = []
    real_train = node_round.train

    def spy(model, data, **kwargs):  # noqa: ANN001, ANN003, ANN202
        handle = model.register_forward_pre_hook(
            lambda _m, args, kw: seen.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                              else kw["attention_mask"]).shape[1]), with_kwargs=True)
        try:
            return real_train(model, data, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(node_round, "train", spy)
    frame, _ = neighbours()
    node = make_node(tmp_path / "n", frame, dataclasses.replace(POLICY, fixed_shape=True))
    req = request(tiny_model_dir)
    assert parse_reply(send(node, req, adapter(tiny_model_dir, req)).content).status == "trained"
    assert seen and set(seen) == {req.model.max_seq_len}


def test_ner_tags_that_probe_for_a_sentence_get_the_same_refusal_from_both(tmp_path, tiny_model_dir) -> None:
    """The same query on a token-classification node: tags name entity types, and the node declares its own."""
    import json as _json

    from tests.tiny_tasks import ner_rows, write_conll

    declared = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    plain = ner_rows(30, seed=3)
    probed = [(["Ann", "takes", "Zyprexa"], ["B-PER", "O", "B-DRUG"]), *plain[1:]]  # one sentence replaced
    nodes = []
    for name, sentences in (("a", probed), ("b", plain)):
        root = tmp_path / name
        root.mkdir()
        data = write_conll(root / "ner.conll", sentences)
        (root / "policy.toml").write_text(policy_toml(POLICY))
        nodes.append({"data-path": str(data), "state-dir": str(root / "state"), "policy": str(root / "policy.toml"),
                      "task": "ner", "labels": _json.dumps(list(declared))})
    base = request(tiny_model_dir)
    for tags in ((*declared, "B-DRUG", "I-DRUG"), ("O", "B-DRUG")):
        req = request(tiny_model_dir, model=dataclasses.replace(base.model, task="ner"), labels=tags)
        replies = [send(Node(n, Path(n["state-dir"])), req, ner_adapter(tiny_model_dir, req)) for n in nodes]
        assert public(replies[0]) == public(replies[1])
        assert parse_reply(replies[0].content).code == "POLICY_LABELS"
    req = request(tiny_model_dir, model=dataclasses.replace(base.model, task="ner"), labels=declared)
    first, second = (parse_reply(send(Node(n, Path(n["state-dir"])), req, ner_adapter(tiny_model_dir, req)).content)
                     for n in nodes)
    assert first.status == second.status == "trained"
    assert first.num_examples == second.num_examples - 1  # the B-DRUG sentence is left out, in the node's log only
