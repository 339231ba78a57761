"""A curious (and malicious) coordinator, scripted: what can it learn from, or do to, a node?

Run by tests/integration/test_curious_server.py through Flower's real simulation engine against the
real fedtune ClientApp. It writes what it observed to the JSON file named by the run config's ``out``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.common.models.adapter import to_record
from fedtune.common.models.base import load_base
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.wire.arrays import record_to_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST, RoundRequest

app = ServerApp()


def _ask(grid: Grid, node: int, request: RoundRequest, arrays) -> Message:
    msg = Message(RecordDict({ARRAYS: arrays, REQUEST: request.to_record()}), message_type=MessageType.TRAIN,
                  dst_node_id=node)
    return next(iter(grid.send_and_receive([msg], timeout=300)))


def _content(reply: Message) -> dict:
    c = reply.content
    return {"config": {k: dict(v) for k, v in c.config_records.items()},
            "metrics": {k: dict(v) for k, v in c.metric_records.items()},
            "arrays": sorted(c.array_records)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    settings = RunSettings.from_config({"model-path": str(context.run_config["model"]), "max-seq-len": 16,
                                        "batch-size": 32, "num-rounds": 3, "epsilon": 8.0, "learning-rate": 0.5})
    import torch

    model = build_model(load_base(settings.model.model_path), 2, settings.lora, torch.device("cpu"), seed=1)
    arrays = to_record(model)
    node = next(iter(grid.get_node_ids()))
    request = RoundRequest(1, "seed-42", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                           settings.privacy)
    # 1. The same round, same weights, same run seed, twice: does the noise cancel in the difference?
    first, second = _ask(grid, node, request, arrays), _ask(grid, node, request, arrays)
    a, b = record_to_arrays(first.content[ARRAYS]), record_to_arrays(second.content[ARRAYS])
    start = record_to_arrays(arrays)
    diff = float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))
    step = float(np.sqrt(sum(float(((a[k] - start[k]) ** 2).sum()) for k in a)))
    # 2. Another "seed" (a new run key) and another class order: a fresh budget?
    reordered = _ask(grid, node, dataclasses.replace(request, run_key="seed-43", labels=("pos", "neg")), arrays)
    # 3. A label list that does not match the node's data (in the old code: rows quoted in the error).
    bad_labels = _ask(grid, node, dataclasses.replace(request, labels=("a", "b")), arrays)
    out.write_text(json.dumps({"diff": diff, "step": step, "replies": [_content(m) for m in
                                                                       (first, second, reordered, bad_labels)]}))
