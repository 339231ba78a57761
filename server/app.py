"""The fedtune ServerApp: FedAvg over LoRA adapters, held-out evaluation, results on disk.

Settings are parsed once here; what reaches the nodes is one typed request per round
(:class:`fedtune.common.wire.contract.RoundRequest`): no seed, no data columns, nothing that keys a budget.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.common import runtime
from fedtune.common.data.table import LabelledData, federation_split
from fedtune.common.models.adapter import AdapterMeta, load_arrays, save_adapter, to_record
from fedtune.common.models.card import write_model_card
from fedtune.common.models.device import pick_device
from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import RoundRequest
from fedtune.server.checkpoint import Checkpoint, CheckpointStore, RoundOffset, run_key
from fedtune.server.divergence import (
    STOP_CODE,
    DivergenceGuard,
    baseline_fields,
    diverged_reason,
    spent_epsilon,
)
from fedtune.server.report import write_report
from fedtune.server.results import ADAPTER_DIR, RunRecorder, card_info, held_out_groups
from fedtune.server.round_line import RoundLine
from fedtune.server.run_record import record_key, write_record
from fedtune.server.strategy import AdapterFedAvg

log = logging.getLogger("fedtune.server")
app = ServerApp()


def held_out(settings: RunSettings) -> LabelledData:
    """The server's evaluation set: the run dataset's held-out split (never in a simulated node's data)."""
    d = settings.data
    data = get_task(settings.model.task).load_data(d)
    return federation_split(data, d.test_fraction, settings.federation.seed, d.max_train_examples)[1]


def _headline(rounds: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """summary.json's first and last value of the task's headline metric (accuracy is there already)."""
    if name == "accuracy" or not rounds:
        return {}
    return {f"initial-{name}": rounds[0].get(name), f"final-{name}": rounds[-1].get(name)}


def _restore(resume: Checkpoint | None, strategy: AdapterFedAvg, recorder: RunRecorder) -> None:
    """The strategy's history and metrics.jsonl as they were at the checkpoint."""
    if resume is None:
        return
    log.info("resuming from the checkpoint after round %s", resume.server_round)
    strategy.restore(resume.outcomes, resume.evaluations)
    recorder.resume(resume.metrics_lines)  # the interrupted run's lines, then the new ones


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_config(context.run_config)
    device = pick_device()
    task = get_task(settings.model.task)
    base = task.load_base(settings.model.model_path)
    test = held_out(settings)
    test_tensors = task.encode(base, test, settings.model.max_seq_len)
    groups = held_out_groups(test.dataset, settings.data.report_group_column)
    model = task.build_model(base, test.label_names, settings.lora, device, seed=settings.federation.seed)
    results_dir = Path(settings.results_dir)
    recorder = RunRecorder(results_dir)
    signing = record_key(results_dir)  # signs the run record: every node's ledger head, per round
    # Checkpoints are a server-side deployment setting (fedtune-server sets the variable), not a run setting.
    store = CheckpointStore(folder) if (folder := runtime.path(runtime.CHECKPOINT_DIR)) else None
    key = run_key(settings.to_config())
    resume = store.resumable(key, settings.plan.num_rounds) if store else None
    offset = resume.server_round if resume else 0
    # The node reuses its noise plan across a resume: same run-key, and resumed-after-round > 0.
    request = RoundRequest(server_round=1, run_key=key, resumed_after_round=offset, labels=tuple(test.label_names),
                           model=settings.model, lora=settings.lora, plan=settings.plan, privacy=settings.privacy)
    strategy = AdapterFedAvg.from_settings(settings, request, str(context.run_id))
    _restore(resume, strategy, recorder)
    first_started = resume.first_started if resume else time.time()
    initial = arrays_to_record(resume.arrays) if resume else to_record(model)
    guard = DivergenceGuard.resumed(settings.federation.divergence_factor, recorder.rounds)
    kept: dict[str, Any] = {"round": offset, "arrays": initial}  # the last round's adapter (before any divergence)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if (resume and server_round == offset) or strategy.stop_code == STOP_CODE:
            return None  # evaluated and recorded before the interruption, or the run has diverged
        load_arrays(model, record_to_arrays(arrays))
        result = task.evaluate(model, base, test, test_tensors, device=device, groups=groups, detail=True)
        outcomes = strategy.outcomes.get(server_round, ())
        line = recorder.record_round(RoundLine(server_round, outcomes, strategy.evaluations.get(server_round, ()),
                                               result, test.label_names).to_row())
        log.info("round %s: held-out accuracy %.4f, loss %.4f, max epsilon %s", server_round,
                 result.accuracy, result.loss, line["epsilon-max"])
        if why := guard.check(server_round, result.loss, outcomes):
            strategy.stop(STOP_CODE, diverged_reason(why, kept_round=int(kept["round"]), private=settings.privacy.dp,
                                                     epsilon=spent_epsilon(recorder.rounds)))
        else:
            kept.update({"round": server_round, "arrays": arrays})
        write_record(results_dir, str(context.run_id), key, strategy.outcomes, signing)
        if store:
            store.save(Checkpoint(
                server_round=server_round, run_key=key, arrays=record_to_arrays(arrays),
                outcomes=strategy.outcomes, evaluations=strategy.evaluations, metrics_lines=recorder.rounds,
                first_started=first_started,
            ))
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    RoundOffset(strategy, offset).start(
        grid=grid, initial_arrays=initial, num_rounds=settings.plan.num_rounds - offset,
        timeout=settings.federation.round_timeout, evaluate_fn=lambda r, arrays: evaluate_global(r + offset, arrays),
    )
    _finish(settings, model, test, recorder, strategy, kept, offset)


def _finish(settings: RunSettings, model: Any, test: LabelledData, recorder: RunRecorder, strategy: AdapterFedAvg,
            kept: dict[str, Any], offset: int) -> None:
    """The run's outputs: the kept adapter (the last aggregate, or the last one before a divergence), the
    summary, the model card and the report."""
    task = get_task(settings.model.task)
    meta = AdapterMeta(task.base_ref(settings.model.model_path, settings.model.base_model_id), test.label_names,
                       settings.model.max_seq_len, task.name)
    adapter_dir = save_adapter(model, record_to_arrays(kept["arrays"]), Path(settings.results_dir) / ADAPTER_DIR,
                               meta=meta)
    outcome = {"status": "stopped-early", "stop-code": strategy.stop_code, "stop-reason": strategy.stop_reason} \
        if strategy.stop_code else {"status": "completed"}
    recorder.finish({"mode": "federated", "adapter": ADAPTER_DIR, "adapter-round": kept["round"], **outcome,
                     "resumed-after-round": offset,
                     **(baseline_fields(test, recorder.rounds) if task.name == "classify" else {}),
                     "excluded-nodes": {str(k): v for k, v in strategy.excluded.items()},
                     "task": task.name, **_headline(recorder.rounds, task.headline),
                     "settings": settings.to_config()})
    write_model_card(adapter_dir, card_info(meta, settings, recorder.rounds, outcome["status"]))
    write_report(Path(settings.results_dir))
