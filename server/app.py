"""The fedtune ServerApp: FedAvg over LoRA adapters, held-out evaluation, results on disk.

Settings are parsed once here; what reaches the nodes is one typed request per round
(:class:`fedtune.common.wire.contract.RoundRequest`): no seed, no data columns, nothing that keys a budget.
The run's steps are :class:`fedtune.server.run.ServerRun`'s; this module reads as their sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common.models.adapter import AdapterMeta, save_adapter
from fedtune.common.models.card import write_model_card
from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import record_to_arrays
from fedtune.server.evaluation import held_out
from fedtune.server.link_state import index_by_destination, pace
from fedtune.server.report import write_report
from fedtune.server.results import ADAPTER_DIR, card_info
from fedtune.server.run import ServerRun

__all__ = ["app", "finish", "held_out", "main"]  # held_out: the held-out split, for fedtune-sim and tests
index_by_destination()  # in a simulation the link state lives in this process: find messages by node
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = ServerRun(RunSettings.from_config(context.run_config), str(context.run_id))  # configure
    pace(grid)  # a simulation's polls for replies, spaced by its number of nodes
    run.aggregate(grid)  # every round: sample, send, aggregate, then evaluate, record, check, sign, checkpoint
    finish(run)


def _headline(rounds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """summary.json's first and last value of the task's headline metric (accuracy is there already)."""
    if name == "accuracy" or not rounds:
        return {}
    return {f"initial-{name}": rounds[0].get(name), f"final-{name}": rounds[-1].get(name)}


def finish(run: ServerRun) -> None:
    """The run's outputs: the kept adapter (the last aggregate, or the last one before a divergence), the
    summary, the model card and the report."""
    settings, recorder, strategy, kept = run.settings, run.recorder, run.strategy, run.kept
    task, model, test = run.held_out.task, run.held_out.model, run.held_out.test
    meta = AdapterMeta(task.base_ref(settings.model.model_path, settings.model.base_model_id), test.label_names,
                       settings.model.max_seq_len, task.name)
    adapter_dir = save_adapter(model, record_to_arrays(kept.arrays), Path(settings.results_dir) / ADAPTER_DIR,
                               meta=meta)
    outcome = {"status": "stopped-early", "stop-code": strategy.stop_code, "stop-reason": strategy.stop_reason} \
        if strategy.stop_code else {"status": "completed"}
    recorder.finish({"mode": "federated", "adapter": ADAPTER_DIR, "adapter-round": kept.server_round, **outcome,
                     "resumed-after-round": run.offset,
                     **task.summary_fields(test, recorder.rounds),
                     "excluded-nodes": {str(k): v for k, v in strategy.excluded.items()},
                     "task": task.name, **_headline(recorder.rounds, task.headline),
                     "settings": settings.to_config()})
    write_model_card(adapter_dir, card_info(meta, settings, recorder.rounds, str(outcome["status"])))
    write_report(Path(settings.results_dir))
