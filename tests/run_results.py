"""A results directory as a finished run leaves it, written through the real recorder (no training)."""

from __future__ import annotations

import json

from fedtune.common.tasks.result import EvalResult
from fedtune.server.results import RunRecorder, eval_fields


def make_results(out, *, groups: bool = True, with_bytes: bool = True, tensorboard: bool = False):
    """A results directory as a 2-client, 2-round DP run leaves it (without the adapter weights)."""
    recorder = RunRecorder(out, tensorboard=tensorboard)
    for rnd, acc in enumerate([0.5, 0.7, 0.8]):
        clients = [] if rnd == 0 else [
            {"node-id": 100 + i, "node": f"simulation:client-{i}", "status": "trained", "epsilon": 2.5 * rnd + i,
             "epsilon-budget": 8.0, "noise-multiplier": 0.8, "sample-rate": 0.2, "steps": 5, "num-examples": 90}
            for i in range(2)]
        result = EvalResult(loss=0.6, accuracy=acc, num_examples=40, confusion=[[15, 5], [3, 17]],
                            group_confusion={f"g{i}": [[3, i % 2], [1, 4]] for i in range(6)} if groups else {})
        line = {"round": rnd, "accuracy": acc, "loss": 0.6, "clients": clients, **eval_fields(result, ["neg", "pos"])}
        if with_bytes:
            line["bytes-received"] = 20_000 * rnd
        recorder.record_round(line)
    config = {"num-clients": 2, "epsilon": 8.0, "model-path": str(out.parent / "models" / "tiny-bert"),
              "dataset": str(out.parent / "data.csv"), "results-dir": str(out), "report-group-column": "group"}
    (out / "config.json").write_text(json.dumps(config))
    recorder.finish({"status": "completed"})
    return out
