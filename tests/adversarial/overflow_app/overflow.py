"""A curious coordinator that tries to turn a training failure into a membership oracle.

It sends every node the same adapters, crafted so that the forward pass of rows close to a direction it
chose overflows (a head far beyond any trained value; values finite as float64 but inf as float32; NaN),
plus an ordinary one, and records each node's replies. Run by tests/adversarial/test_overflow_oracle.py
through Flower's real simulation engine against the real ClientApp, on two nodes whose data differ in one
target row: if any reply differed between them, the failure would say whether the target was sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import load_base
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.wire.arrays import arrays_to_record
from fedtune.common.wire.contract import ARRAYS, REQUEST, RoundRequest

app = ServerApp()
CRAFTED = {"ordinary": None, "float32-overflow": 1e39, "huge": 1e8, "at-the-bound": 1e4, "nan": float("nan")}
TARGET = "the target patient story plot"  # the row the coordinator asks about (tests/adversarial/node.py)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def targeted(model: torch.nn.Module, tokenizer, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The head along the target row's pooled features, scaled so that its logit just overflows float32 while
    rows pointing elsewhere stay finite: on the old node the update was NaN exactly when the target was drawn."""
    from fedtune.common.models.base import encode

    seen: list[torch.Tensor] = []
    head = model.base_model.model.head
    hook = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    ids, mask = encode(tokenizer, [TARGET], 16)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    features = seen[0][0].double().numpy()
    norm = float(np.linalg.norm(features))
    out = dict(start)
    name = next(k for k in start if "head" in k and k.endswith("weight"))
    weight = np.zeros(start[name].shape, dtype=np.float64)
    weight[1] = features / norm * (FLOAT32_MAX / (0.995 * norm))  # logit 1 = FLOAT32_MAX * cos / 0.995
    out[name] = weight
    return out


def _content(reply: Message) -> dict:
    c = reply.content
    return {"config": {k: dict(v) for k, v in c.config_records.items()},
            "metrics": {k: dict(v) for k, v in c.metric_records.items()},
            "arrays": sorted(c.array_records)}


def _crafted(start: dict[str, np.ndarray], value: float | None) -> dict[str, np.ndarray]:
    """The head pointed along one direction, scaled to ``value`` (float64, as a server may send it)."""
    if value is None:
        return start
    out = dict(start)
    for name, array in start.items():
        if "head" in name and name.endswith("weight"):
            direction = np.zeros(array.shape, dtype=np.float64)
            direction[1] = 1.0 / np.sqrt(array.shape[1])  # class 1 along the diagonal direction
            out[name] = direction * value if np.isfinite(value) else np.full(array.shape, value, dtype=np.float64)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    # batch-size above a node's rows: q = 1, every row (the target too) is in every batch
    settings = RunSettings.from_config({"model-path": str(context.run_config["model"]), "max-seq-len": 16,
                                        "batch-size": 1024, "num-rounds": 8, "epsilon": 8.0})
    base = load_base(settings.model.model_path)
    model = build_model(base, 2, settings.lora, torch.device("cpu"), seed=1)
    start = to_arrays(model)
    adapters = {name: _crafted(start, value) for name, value in CRAFTED.items()}
    adapters["targeted-overflow"] = targeted(model, base.tokenizer, start)
    nodes = sorted(grid.get_node_ids())
    observed: dict[str, list[dict]] = {}
    for round_no, (name, arrays) in enumerate(adapters.items(), start=1):
        request = RoundRequest(round_no, "curious", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                               settings.privacy)
        messages = [Message(RecordDict({ARRAYS: arrays_to_record(arrays), REQUEST: request.to_record()}),
                            message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]
        replies = sorted(grid.send_and_receive(messages, timeout=300), key=lambda m: m.metadata.src_node_id)
        observed[name] = [_content(m) for m in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(observed))
