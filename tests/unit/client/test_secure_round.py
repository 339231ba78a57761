"""The node's side of secure aggregation: only SecAgg+ rounds count as secure, the policy can require them,
and a server cannot widen the secure sum's grid (all checked before any row is read or anything charged)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.client.secure_aggregation import SECURE, _grid_problems, secure_aggregation_mod
from fedtune.common.settings import AggregationSettings
from fedtune.common.wire.contract import ErrorReply, TrainReply, parse_reply
from fedtune.common.wire.secure_sum import MODULUS, target_range, value_range
from tests.unit.client.test_app_contract import _request, _send, node  # noqa: F401  (node: a fixture)

pytestmark = pytest.mark.usefixtures("flower_task_identity")
SECURE_REQUEST = AggregationSettings(secure_aggregation=True)


def _ledger_lines(node_config: dict) -> int:
    ledgers = list(Path(str(node_config["state-dir"])).rglob("*.jsonl"))
    return sum(len(p.read_text().splitlines()) for p in ledgers)


def test_a_plain_round_that_claims_secure_aggregation_is_a_bad_request(node, tiny_model_dir):  # noqa: F811
    reply = parse_reply(_send(node, _request(tiny_model_dir, aggregation=SECURE_REQUEST), tiny_model_dir).content)
    assert isinstance(reply, ErrorReply) and reply.code == "BAD_REQUEST"
    assert _ledger_lines(node) == 0  # nothing charged, nothing written


def test_the_server_cannot_set_the_secure_marker(node, tiny_model_dir):  # noqa: F811
    msg = Message(RecordDict({SECURE: ConfigRecord({"threshold": 2})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    seen = secure_aggregation_mod(msg, context, lambda m, c: m)
    assert SECURE not in seen.content.config_records


def test_a_policy_that_requires_secure_aggregation_refuses_plain_rounds(node, tiny_model_dir, tmp_path):  # noqa: F811
    policy = NodePolicy(max_epsilon=4.0, dataset_id="ward-7", accountant="rdp", max_noise_multiplier=50.0,
                        require_secure_aggregation=True)
    Path(str(node["policy"])).write_text(policy_toml(policy))
    reply = parse_reply(_send(node, _request(tiny_model_dir), tiny_model_dir).content)
    assert isinstance(reply, TrainReply) and reply.status == "refused"
    assert reply.code == "POLICY_SECURE_AGGREGATION" and reply.epsilon_round == 0.0
    assert _ledger_lines(node) >= 1  # the refusal is in the node's ledger


def _protocol(request, nodes: int = 3, **changes: float) -> dict[str, float]:
    good = {"sample_num": nodes, "threshold": 2, "target_range": target_range(nodes), "mod_range": MODULUS,
            "max_weight": 1.0,
            "clipping_range": value_range(request.aggregation, request.plan, request.privacy)}
    return good | changes


@pytest.mark.parametrize(("change", "problem"), [
    ({}, None),
    ({"clipping_range": 1024.0}, "value range"),  # a wider range: coarser grid, larger noise-free steps
    ({"target_range": 2**31}, "target range"),  # a sum that can wrap
    ({"max_weight": 1000.0}, "value range"),  # Flower would rescale the update
    ({"threshold": 1}, "threshold"),
    ({"sample_num": 1, "target_range": target_range(1)}, "target range"),
])
def test_the_node_checks_the_protocols_grid_against_the_request(tiny_model_dir, change, problem):
    request = dataclasses.replace(_request(tiny_model_dir), aggregation=SECURE_REQUEST)
    problems = _grid_problems(request, _protocol(request, **change))
    assert (problem is None and not problems) or (problem is not None and problem in " ".join(problems))
