"""A whole SecAgg+ round in one process: the real server wrapper and workflow against three real ClientApps.

What a curious server holds after it: the contract's reply fields and masked vectors, never a node's update;
and the sum it unmasks is the plain mean of the nodes' updates to within one grid step.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedtune.client import app as client_app
from fedtune.client import secure_aggregation as node_side
from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import load_base
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import ARRAYS, RoundRequest
from fedtune.common.wire.secure_sum import flatten, summed_names
from fedtune.server.secure_aggregation import SecureAggregation
from fedtune.server.strategy import AdapterFedAvg
from tests.tiny import make_sentiment_frame

pytestmark = pytest.mark.usefixtures("flower_task_identity")
NODES = (11, 22, 33)


class InProcessGrid:
    """Delivers each message to the real ClientApp of its node (one Context per node, kept across messages),
    and keeps every reply: the server's whole view."""

    def __init__(self, configs: dict[int, dict]) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
                         for n, c in configs.items()}
        self.run = types.SimpleNamespace(run_id=1)
        self.seen: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        # Each node gets its own copy, as over a network (Flower's workflow shares one content between messages).
        replies = [client_app.app(copy.deepcopy(m), self.contexts[m.metadata.dst_node_id]) for m in messages]
        self.seen += replies
        return replies


def _node(root: Path, i: int) -> dict:
    make_sentiment_frame(90, seed=i).to_csv(root / f"n{i}.csv", index=False)
    policy = NodePolicy(max_epsilon=4.0, dataset_id=f"ward-{i}", accountant="rdp", max_noise_multiplier=50.0)
    (root / f"p{i}.toml").write_text(policy_toml(policy))
    return {"data-path": str(root / f"n{i}.csv"), "state-dir": str(root / f"s{i}"),
            "policy": str(root / f"p{i}.toml"), "labels": "neg,pos"}


def test_the_server_sees_only_masked_vectors_and_unmasks_the_mean(tiny_model_dir, tmp_path, monkeypatch):
    settings = RunSettings.from_config({"model-path": str(tiny_model_dir), "max-seq-len": 12, "batch-size": 32,
                                        "num-rounds": 2, "epsilon": 2.0, "secure-aggregation": "true"})
    request = RoundRequest(1, "run-k", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                           settings.privacy, settings.aggregation)
    reference = to_arrays(build_model(load_base(str(tiny_model_dir)), 2, settings.lora, torch.device("cpu")))
    sent: dict[int, np.ndarray] = {}  # instrumentation: what each node put into the sum (never sent in clear)
    deltas: list[np.ndarray] = []
    real_encode = node_side.encode

    def spy(update, ref, names, req, *, threshold, target):  # noqa: ANN001, ANN202
        vector, clamped = real_encode(update, ref, names, req, threshold=threshold, target=target)
        deltas.append(flatten(update, names) - flatten(ref, names))
        sent[len(sent)] = vector
        return vector, clamped

    monkeypatch.setattr(node_side, "encode", spy)
    grid = InProcessGrid({n: _node(tmp_path, i) for i, n in enumerate(NODES)})
    inner = AdapterFedAvg(request, run_id="1", min_train_nodes=3, min_available_nodes=3)
    secure = SecureAggregation(inner, settings)
    assert list(secure.configure_train(1, arrays_to_record(reference), ConfigRecord(), grid)) == []
    arrays, summary = secure.aggregate_train(1, [])

    info = secure.rounds[1]
    assert arrays is not None and info.aggregated and info.in_sum == info.trained == 3 and info.threshold >= 2
    assert summary is not None and summary["clients-trained"] == 3
    assert [o.status for o in inner.outcomes[1]] == ["trained"] * 3 and all(o.reply for o in inner.outcomes[1])
    # The server's view: no reply carries an adapter; the masked vectors are not the nodes' vectors.
    assert not any(ARRAYS in m.content.array_records for m in grid.seen)
    masked = [bytes_to_ndarray(b) for m in grid.seen
              for b in m.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS, [])]
    assert len(masked) == 3 * 2  # per node: the weight factor and the vector
    vectors = [m for m in masked if m.size > 1]
    for v in vectors:
        for mine in sent.values():
            assert np.mean(v.astype(np.float64) == np.round(mine / info.step)) < 0.01
    # The unmasked sum: the plain mean of the updates, to within one grid step per coordinate.
    names = summed_names(reference)
    new = record_to_arrays(arrays)
    got = flatten(new, names) - flatten(reference, names)
    assert np.max(np.abs(got - np.mean(deltas, axis=0))) <= 2 * info.step
    assert np.linalg.norm(np.mean(deltas, axis=0)) > 1e-3  # the nodes did move the adapter
