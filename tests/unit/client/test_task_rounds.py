"""One DP-SGD round of each new task through the real ClientApp handler (wire, policy, signed ledger charge,
Opacus), in-process and fast; the Flower simulation of whole federations is in tests/integration."""

from __future__ import annotations

import json
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
from fedtune.common.wire.arrays import record_to_arrays
from fedtune.common.wire.contract import RoundRequest, TrainReply, parse_reply
from tests.tiny_tasks import make_tiny_decoder, ner_rows, sft_rows, write_conll, write_sft_jsonl

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # a ClientApp called in-process


def _node(tmp_path: Path, data: Path, task: str, labels: tuple[str, ...]) -> dict[str, object]:
    policy = NodePolicy(max_epsilon=4.0, dataset_id="ward-7", accountant="rdp", max_noise_multiplier=50.0)
    (tmp_path / "policy.toml").write_text(policy_toml(policy))
    return {"data-path": str(data), "state-dir": str(tmp_path / "state"), "policy": str(tmp_path / "policy.toml"),
            "task": task, "labels": json.dumps(list(labels))}  # node config values are scalars


def _round(tmp_path: Path, task_name: str, model_dir: Path, data: Path, labels: tuple[str, ...],
           extra: dict[str, object]) -> tuple[RoundRequest, Message, dict[str, np.ndarray]]:
    settings = RunSettings.from_config({"task": task_name, "model-path": str(model_dir), "max-seq-len": 24,
                                        "batch-size": 16, "num-rounds": 2, "epsilon": 4.0, **extra})
    request = RoundRequest(1, "run-k", 0, labels, settings.model, settings.lora, settings.plan, settings.privacy)
    task = get_task(task_name)
    model = task.build_model(task.load_base(str(model_dir)), labels, request.lora, torch.device("cpu"))
    content = RecordDict({"arrays": to_record(model), "request": request.to_record()})
    context = Context(run_id=1, node_id=7, node_config=_node(tmp_path, data, task_name, labels), state=RecordDict(),
                      run_config={})
    reply = client_app.train(Message(content, dst_node_id=7, message_type="train"), context)
    return request, reply, record_to_arrays(content["arrays"])


def _assert_trained(reply: Message, before: dict[str, np.ndarray], tmp_path: Path) -> None:
    parsed = parse_reply(reply.content)
    assert isinstance(parsed, TrainReply) and parsed.status == "trained", parsed
    assert 0 < parsed.epsilon <= 4.0 and parsed.noise_multiplier > 0
    after = record_to_arrays(reply.content["arrays"])
    assert set(after) == set(before) and any(np.any(after[k] != before[k]) for k in after if "lora_" in k)
    ledger = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert [e["decision"] for e in ledger if "decision" in e] == ["charged"]


def test_sft_round_trains_the_decoder_adapter_under_dp(tmp_path: Path) -> None:
    decoder = make_tiny_decoder(tmp_path / "dec")
    data = write_sft_jsonl(tmp_path / "chat.jsonl", sft_rows(48))
    request, reply, before = _round(tmp_path, "sft", decoder, data, (), {"lora-targets": "q_proj,v_proj,up_proj"})
    assert RoundRequest.from_record(request.to_record()).model.task == "sft"  # the task travels in the request
    _assert_trained(reply, before, tmp_path)


def test_ner_round_trains_lora_and_the_token_head_under_dp(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_conll(tmp_path / "ner.conll", ner_rows(48))
    labels = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    _, reply, before = _round(tmp_path, "ner", tiny_model_dir, data, labels, {})
    _assert_trained(reply, before, tmp_path)
    assert any("classifier" in k for k in before)  # the token head travels with the adapter


def test_a_bad_line_leaves_its_sentence_out_and_the_round_trains(tmp_path: Path, tiny_model_dir: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A malformed line costs its sentence, named in the node's own log: the reply does not depend on it."""
    data = write_conll(tmp_path / "ner.conll", ner_rows(48))
    data.write_text(data.read_text() + "\nAnn NNP B-PER\nin IN\n")  # the last sentence: a wrong column count
    labels = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    _, reply, before = _round(tmp_path, "ner", tiny_model_dir, data, labels, {})
    _assert_trained(reply, before, tmp_path)
    assert "ner.conll line" in caplog.text and "left out" in caplog.text
    assert "ner.conll" not in json.dumps(dict(reply.content.config_records["status"]))


def test_a_file_with_no_usable_sentence_fails_before_any_charge(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "ner.conll"
    data.write_text("Ann NNP B-PER\nin IN\n")  # line 2: wrong column count, so no sentence is left
    _, reply, _ = _round(tmp_path, "ner", tiny_model_dir, data, ("O", "B-PER", "I-PER"), {})
    assert reply.content.config_records["status"]["code"] == "DATA_EMPTY"
    assert "ner.conll" not in json.dumps(dict(reply.content.config_records["status"]))
    assert not (tmp_path / "state" / "ledger.jsonl").exists() or "charged" not in (
        tmp_path / "state" / "ledger.jsonl").read_text()
