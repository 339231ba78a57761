"""Property: for any request, two nodes whose datasets differ in one row say the same thing before their charge.

Hypothesis draws requests the way a curious server would vary them (task, label sets that name or omit a
label only one row has, allowed and unknown models, sequence lengths, DP modes, deltas, adapters that are
ordinary, oversized or not finite); each goes to two fresh nodes, one holding a row labelled ``HIV+``
(outside the declared labels) where the other holds an ordinary row. Every reply sent before the charge (a
request refusal or a request error) must be the same from both, field by field, apart from each node's own
receipt fields.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.client.policy import NodePolicy
from fedtune.common.wire.contract import RoundRequest
from tests.adversarial.node import adapter, make_node, neighbours, public, request, send, with_values

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # a ClientApp called in-process

PRE_CHARGE = {"POLICY_TASK", "POLICY_LABELS", "POLICY_DP_REQUIRED", "POLICY_DELTA", "POLICY_MODEL", "POLICY_SEQ_LEN",
              "BAD_REQUEST", "MODEL"}
NAMES = ["neg", "pos", "HIV+", "other"]


def _policy(model_dir: Path) -> NodePolicy:
    return NodePolicy(max_epsilon=4.0, dataset_id="ward-7", accountant="rdp", max_noise_multiplier=50.0,
                      allowed_models=(str(model_dir),), max_seq_len=32)


@st.composite
def requests(draw: st.DrawFn, model_dir: Path) -> tuple[RoundRequest, float]:
    base = request(model_dir)
    task = draw(st.sampled_from(["classify", "classify", "ner", "sft"]))
    labels = tuple(draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=4, unique=True)))
    path = draw(st.sampled_from([str(model_dir), str(model_dir), "/nonexistent/model", ""]))
    model = dataclasses.replace(base.model, task=task, model_path=path,
                                max_seq_len=draw(st.sampled_from([8, 12, 48, 2000])))
    mode = draw(st.sampled_from(["dp", "dp", "off", "clip-only"]))
    privacy = dataclasses.replace(base.privacy, dp_mode=mode,
                                  delta=draw(st.sampled_from([1e-5, 1e-6, 1e-3])))
    head = draw(st.sampled_from([None, None, 1e39, 1e8, float("inf")]))
    return dataclasses.replace(base, model=model, privacy=privacy, labels=labels), head


def _check(model_dir: Path, req: RoundRequest, head: float | None) -> None:
    with_target, without = neighbours(target_label="HIV+")
    arrays = adapter(model_dir, request(model_dir), labels=2)
    if len(req.labels) != 2:
        arrays = adapter(model_dir, req, labels=len(req.labels))
    if head is not None:
        arrays = with_values(arrays, "head", head)
    with tempfile.TemporaryDirectory() as tmp:
        replies = [send(make_node(Path(tmp) / name, frame, _policy(model_dir)), req, arrays)
                   for name, frame in (("a", with_target), ("b", without))]
    codes = [dict(r.content.config_records["status"]).get("code", "") for r in replies]
    pre = [code in PRE_CHARGE for code in codes]
    assert pre[0] == pre[1], codes
    if pre[0]:
        assert public(replies[0]) == public(replies[1])


@pytest.mark.parametrize("examples", [pytest.param(12, id="12"), pytest.param(80, id="80", marks=pytest.mark.slow)])
def test_nothing_said_before_the_charge_depends_on_a_row(tiny_model_dir: Path, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(requests(tiny_model_dir))
    def check(drawn: tuple[RoundRequest, float]) -> None:
        _check(tiny_model_dir, *drawn)

    check()
