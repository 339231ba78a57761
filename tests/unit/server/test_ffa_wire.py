"""FFA-LoRA on the wire: a node sends only what trains (B and the head), the server restores the shared A.

A real ClientApp round (wire, policy, signed charge, Opacus) with LoRA in the top layer only, so the node
also trains from its cached lower-layer states; its reply goes through the strategy's reply validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedtune.client import app as client_app
from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.common.models.adapter import to_record
from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import RoundRequest, TrainReply, parse_reply
from fedtune.server.replies import train_outcome

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # a ClientApp called in-process


def _round(tmp_path: Path, model_dir: Path, data: Path, variant: str) -> tuple[Message, dict[str, np.ndarray]]:
    settings = RunSettings.from_config({"model-path": str(model_dir), "max-seq-len": 16, "batch-size": 32,
                                        "num-rounds": 2, "epsilon": 4.0, "lora-variant": variant,
                                        "lora-layers": "1", "lora-rank": 4})
    request = RoundRequest(1, "run-k", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                           settings.privacy)
    task = get_task("classify")
    model = task.build_model(task.load_base(str(model_dir)), request.labels, request.lora, torch.device("cpu"))
    policy = NodePolicy(max_epsilon=4.0, dataset_id=f"ward-{variant}", accountant="rdp", max_noise_multiplier=50.0)
    (tmp_path / "policy.toml").write_text(policy_toml(policy))
    node = {"data-path": str(data), "state-dir": str(tmp_path / "state"), "policy": str(tmp_path / "policy.toml"),
            "text-column": "text", "label-column": "label", "labels": "neg,pos"}
    content = RecordDict({"arrays": to_record(model), "request": request.to_record()})
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = client_app.train(Message(content, dst_node_id=7, message_type="train"), context)
    return reply, record_to_arrays(content["arrays"])


def test_an_ffa_node_sends_b_only_and_the_server_restores_a(tmp_path, tiny_model_dir, sentiment_csv):
    reply, sent = _round(tmp_path, tiny_model_dir, sentiment_csv, "ffa")
    parsed = parse_reply(reply.content)
    assert isinstance(parsed, TrainReply) and parsed.status == "trained", parsed
    back = record_to_arrays(reply.content["arrays"])
    assert back and not any("lora_A" in k for k in back)
    assert {k for k in sent if "lora_A" not in k} == set(back)
    assert any("lora_B" in k and np.any(back[k] != sent[k]) for k in back)

    outcome, update = train_outcome(reply, sent, "ffa")
    assert outcome.status == "trained" and update is not None
    assert set(update) == set(sent)
    for name in sent:
        expected = sent[name] if "lora_A" in name else back[name]
        assert np.array_equal(update[name], expected), name
    assert outcome.received_bytes is not None and outcome.received_bytes < sum(v.nbytes for v in sent.values())


def test_an_ffa_reply_that_carries_a_is_rejected(tmp_path, tiny_model_dir, sentiment_csv):
    reply, sent = _round(tmp_path, tiny_model_dir, sentiment_csv, "ffa")
    with_a = record_to_arrays(reply.content["arrays"]) | {k: v for k, v in sent.items() if "lora_A" in k}
    forged = Message(RecordDict({**{k: v for k, v in reply.content.items() if k != "arrays"},
                                 "arrays": arrays_to_record(with_a)}), reply_to=reply)
    outcome, update = train_outcome(forged, sent, "ffa")
    assert update is None and outcome.code == "BAD_UPDATE"


def test_a_plain_lora_node_still_sends_every_trainable_tensor(tmp_path, tiny_model_dir, sentiment_csv):
    reply, sent = _round(tmp_path, tiny_model_dir, sentiment_csv, "lora")
    back = record_to_arrays(reply.content["arrays"])
    assert set(back) == set(sent) and any("lora_A" in k for k in back)
    outcome, update = train_outcome(reply, sent, "lora")
    assert outcome.status == "trained" and update is not None and set(update) == set(sent)
