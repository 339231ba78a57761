"""Results directory: CSV beside the JSONL, TensorBoard events read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedtune.common.settings import PrivacySettings
from fedtune.common.tasks.result import EvalResult
from fedtune.server.results import (
    METRICS_FILE,
    RunRecorder,
    eval_fields,
    node_statements,
    portable,
    read_rounds,
)


def _line(rnd: int, acc: float) -> dict:
    clients = [] if rnd == 0 else [
        {"node-id": 11, "node": "simulation:client-0", "status": "trained", "epsilon": 1.5 * rnd, "epsilon-budget": 8.0,
         "noise-multiplier": 0.9, "sample-rate": 0.25, "steps": 4, "num-examples": 100},
        {"node-id": 12, "node": "simulation:client-1", "status": "refused" if rnd == 2 else "trained", "epsilon": 2.0,
         "epsilon-budget": 2.0, "noise-multiplier": 1.1, "sample-rate": 0.5, "steps": 2, "num-examples": 50},
    ]
    result = EvalResult(loss=1.0 / (rnd + 1), accuracy=acc, num_examples=10, confusion=[[4, 1], [2, 3]],
                        group_confusion={"g1": [[4, 0], [0, 1]], "g2": [[0, 1], [2, 2]]})
    return {"round": rnd, "accuracy": acc, "loss": 1.0 / (rnd + 1), "epsilon-max": None, "clients": clients,
            "bytes-received": 1000 * rnd, **eval_fields(result, ["neg", "pos"])}


@pytest.fixture
def recorded(tmp_path):
    recorder = RunRecorder(tmp_path)
    accuracies = [0.5, 0.625, 0.75]
    for rnd, acc in enumerate(accuracies):
        recorder.record_round(_line(rnd, acc))
    recorder.finish({"adapter": str(tmp_path / "adapter"), "settings": {"model-path": "/abs/models/tiny-bert"}})
    return tmp_path, accuracies


def test_tensorboard_events_hold_every_rounds_accuracy(recorded):
    out, accuracies = recorded
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("accuracy/held-out")] == list(enumerate(accuracies))
    assert {"loss/held-out", "recall/neg", "recall/pos", "epsilon/client-0", "epsilon/client-1",
            "bytes/bytes-received"} <= set(tags)
    assert [e.value for e in acc.Scalars("recall/pos")] == pytest.approx([0.6] * 3)
    assert [e.value for e in acc.Scalars("epsilon/client-0")] == pytest.approx([1.5, 3.0])


def test_csv_has_one_row_per_round_with_per_label_recall(recorded):
    out, accuracies = recorded
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [float(r["accuracy"]) for r in rows] == pytest.approx(accuracies)
    assert rows[0]["recall:neg"] == "0.8" and rows[2]["bytes-received"] == "2000"
    assert rows[0]["epsilon-max"] == ""
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[2]["per-label"]["pos"] == {"precision": 0.75, "recall": 0.6, "f1": pytest.approx(2 / 3, 1e-5),
                                             "support": 5}
    assert jsonl[1]["groups"]["g2"] == {"num-examples": 5, "accuracy": 0.4, "confusion": [[0, 1], [2, 2]]}


def test_summary_holds_no_absolute_path(recorded):
    out, _ = recorded
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == "adapter" and summary["settings"]["model-path"] == "tiny-bert"
    assert str(out) not in (out / "summary.json").read_text()


def test_node_statements_take_each_nodes_last_reply():
    rounds = [_line(0, 0.5), _line(1, 0.6), _line(2, 0.7)]
    nodes = {n.node: n for n in node_statements(rounds, PrivacySettings(delta=1e-6, accountant="rdp"))}
    assert nodes["client-0"].epsilon == 3.0 and nodes["client-0"].steps == 8 and nodes["client-0"].rounds == 2
    assert nodes["client-1"].epsilon == 2.0 and nodes["client-1"].rounds == 1 and nodes["client-1"].steps == 2
    assert nodes["client-0"].delta == 1e-6 and nodes["client-0"].accountant == "rdp"
    no_dp = [{"round": 1, "clients": [{"node": "simulation:client-3", "status": "trained", "epsilon": math.inf,
                                       "steps": 1}]}]
    assert node_statements(no_dp, PrivacySettings())[0].epsilon is None


def test_portable_keeps_only_the_last_component_of_absolute_paths():
    assert portable({"a": "/x/y/data.csv", "b": ["rel/path", "/z"], "c": 3, "d": ""}) == {
        "a": "data.csv", "b": ["rel/path", "z"], "c": 3, "d": ""}


def test_the_reader_returns_the_recorded_lines(recorded):
    out, accuracies = recorded
    assert [line["accuracy"] for line in read_rounds(out)] == accuracies


def test_the_reader_skips_the_line_being_written_and_anything_not_a_round(tmp_path):
    assert read_rounds(tmp_path) == []  # no file yet
    (tmp_path / METRICS_FILE).write_text('{"round": 0, "accuracy": 0.5}\n\n[1, 2]\n{"no-round": 1}\n'
                                         '{"round": 1, "accuracy": 0.6}\n{"round": 2, "acc')
    assert read_rounds(tmp_path) == [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.6}]


def test_a_resumed_recorder_continues_after_the_checkpointed_lines(tmp_path):
    lines = [{"round": 0, "accuracy": 0.5, "elapsed-s": 1.0}, {"round": 1, "accuracy": 0.6, "elapsed-s": 2.0}]
    recorder = RunRecorder(tmp_path, tensorboard=False)
    recorder.resume(lines)
    recorder.record_round({"round": 2, "accuracy": 0.7})
    assert read_rounds(tmp_path)[:2] == lines and [line["round"] for line in recorder.rounds] == [0, 1, 2]
