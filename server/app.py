"""The fedtune ServerApp: FedAvg over LoRA adapters, held-out evaluation, results on disk."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fedtune.common.adapter import load_arrays, record_to_arrays, save_adapter, to_record
from fedtune.common.data import LabelledData, holdout_split, load_labelled
from fedtune.common.device import pick_device
from fedtune.common.evaluation import evaluate
from fedtune.common.model import build_model, encode, load_base
from fedtune.common.settings import RunSettings
from fedtune.server.results import ADAPTER_DIR, RunRecorder
from fedtune.server.strategy import AdapterFedAvg
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger("fedtune.server")
app = ServerApp()

# Keys of the per-round plan sent to clients: the training plan and the DP request.
PLAN_KEYS = ("num-rounds", "local-epochs", "batch-size", "learning-rate", "dp", "epsilon", "delta",
             "clip-norm", "accountant")


def held_out(settings: RunSettings) -> LabelledData:
    """The server's evaluation set: the run dataset's held-out split (never trained on)."""
    return holdout_split(load_labelled(settings.data), settings.data.test_fraction, settings.plan.seed)[1]


def _round_line(server_round: int, strategy: AdapterFedAvg, accuracy: float, loss: float) -> dict[str, Any]:
    rows = strategy.train_rows.get(server_round, [])
    eps = [float(r["epsilon"]) for r in rows if "epsilon" in r]
    evals = strategy.eval_rows.get(server_round, [])
    n_eval = sum(r.get("num-examples", 0) for r in evals)
    return {
        "round": server_round, "accuracy": accuracy, "loss": loss,
        "train-loss": (sum(r["train-loss"] * r["num-examples"] for r in rows if r["status"] == "trained")
                       / max(1, sum(r["num-examples"] for r in rows if r["status"] == "trained")))
        if any(r["status"] == "trained" for r in rows) else None,
        "epsilon-max": max(eps) if eps else None,
        "epsilon-mean": sum(eps) / len(eps) if eps else None,
        "client-accuracy": sum(r["eval-accuracy"] * r["num-examples"] for r in evals) / n_eval if n_eval else None,
        "clients": rows,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_config(context.run_config)
    device = pick_device()
    base = load_base(settings.model.model_path)
    test = held_out(settings)
    test_tensors = (*encode(base.tokenizer, test.dataset["text"], settings.model.max_seq_len),
                    torch.tensor(list(test.dataset["label"]), dtype=torch.long))
    model = build_model(base, len(test.label_names), settings.lora, device, seed=settings.plan.seed)
    recorder = RunRecorder(Path(settings.results_dir))
    strategy = AdapterFedAvg(
        fraction_train=settings.plan.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=settings.plan.min_clients, min_evaluate_nodes=settings.plan.min_clients,
        min_available_nodes=settings.plan.min_clients,
    )

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_arrays(model, record_to_arrays(arrays))
        result = evaluate(model, *test_tensors, device=device)
        line = recorder.record_round(_round_line(server_round, strategy, result.accuracy, result.loss))
        log.info("round %s: held-out accuracy %.4f, loss %.4f, max epsilon %s", server_round,
                 result.accuracy, result.loss, line["epsilon-max"])
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    plan = {k: v for k, v in settings.to_config().items() if k in PLAN_KEYS}
    result = strategy.start(
        grid=grid, initial_arrays=to_record(model), num_rounds=settings.plan.num_rounds,
        train_config=ConfigRecord(plan), evaluate_config=ConfigRecord(plan), evaluate_fn=evaluate_global,
    )
    final = result.arrays if len(result.arrays) else to_record(model)
    adapter_dir = save_adapter(model, record_to_arrays(final), Path(settings.results_dir) / ADAPTER_DIR,
                               base_path=str(base.path), label_names=test.label_names)
    recorder.finish({"adapter": str(adapter_dir), "status": "completed"})
