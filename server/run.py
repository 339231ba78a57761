"""One run of the ServerApp, as named steps.

:class:`ServerRun` is configured once from the run's settings (the held-out evaluation, the results directory,
the record key, the checkpoint to resume from, the round request and the strategy). :meth:`ServerRun.aggregate`
then runs Flower's rounds with :class:`~fedtune.server.strategy.AdapterFedAvg` (sample the nodes, send the
request, aggregate the valid updates), and every round ends with the same steps (:meth:`ServerRun.end_round`):
evaluate the aggregate on the held-out set, record the round's metrics line, check it for divergence, sign the
run record, checkpoint. What the run keeps is :attr:`ServerRun.kept` (the adapter of the last round before
any divergence); the ServerApp turns it into the run's outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedtune.common import runtime
from fedtune.common.models.adapter import to_record
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import RoundRequest
from fedtune.server.checkpoint import Checkpoint, CheckpointStore, RoundOffset, run_key
from fedtune.server.divergence import STOP_CODE, DivergenceGuard, diverged_reason, spent_epsilon
from fedtune.server.evaluation import HeldOut
from fedtune.server.results import RunRecorder
from fedtune.server.round_line import RoundLine
from fedtune.server.run_record import record_key, write_record
from fedtune.server.secure_aggregation import SecureAggregation
from fedtune.server.strategy import AdapterFedAvg

if TYPE_CHECKING:
    from fedtune.common.settings import RunSettings
    from fedtune.common.tasks.result import EvalResult

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class Kept:
    """The adapter a run keeps: the last round's, or the last one before training diverged."""

    server_round: int
    arrays: ArrayRecord


def checkpoint_store() -> CheckpointStore | None:
    """Checkpoints are a server-side deployment setting (fedtune-server sets the variable), not a run setting."""
    folder = runtime.path(runtime.CHECKPOINT_DIR)
    return CheckpointStore(folder) if folder else None


class ServerRun:
    """The ServerApp's run: configure (the constructor), aggregate, and each round's end as named steps."""

    def __init__(self, settings: RunSettings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id  # this attempt's Flower run id (each receipt names it)
        self.held_out = HeldOut.build(settings)
        self.results_dir = Path(settings.results_dir)
        self.recorder = RunRecorder(self.results_dir)
        self.signing = record_key(self.results_dir)  # signs the run record: every node's ledger head, per round
        self.store = checkpoint_store()
        self.key = run_key(settings.to_config())
        resume = self.store.resumable(self.key, settings.plan.num_rounds) if self.store else None
        self.resumed = resume is not None
        self.offset = resume.server_round if resume else 0  # rounds done before an interruption
        self.strategy = AdapterFedAvg.from_settings(settings, self._request(), run_id)
        # What runs Flower's rounds: the strategy itself, or the strategy with its training step summed by SecAgg+.
        self.secure = SecureAggregation(self.strategy, settings) if settings.aggregation.secure_aggregation else None
        if resume is not None:
            log.info("resuming from the checkpoint after round %s", resume.server_round)
            self.strategy.restore(resume.outcomes, resume.evaluations)
            self.recorder.resume(resume.metrics_lines)  # the interrupted run's lines, then the new ones
        self.first_started = resume.first_started if resume else time.time()
        self.kept = Kept(self.offset, arrays_to_record(resume.arrays) if resume else to_record(self.held_out.model))
        self.guard = DivergenceGuard.resumed(settings.federation.divergence_factor, self.recorder.rounds)

    def _request(self) -> RoundRequest:
        """The round's request (the strategy sets the round); a node reuses its noise plan across a resume:
        same run-key, and resumed-after-round > 0."""
        s = self.settings
        return RoundRequest(server_round=1, run_key=self.key, resumed_after_round=self.offset,
                            labels=tuple(self.held_out.test.label_names), model=s.model, lora=s.lora, plan=s.plan,
                            privacy=s.privacy, aggregation=s.aggregation)

    def aggregate(self, grid: Grid) -> None:
        """Flower's rounds with the strategy (sample, send, aggregate), numbered from the resumed round on;
        each ends with :meth:`end_round`."""
        RoundOffset(self.secure or self.strategy, self.offset).start(
            grid=grid, initial_arrays=self.kept.arrays, num_rounds=self.settings.plan.num_rounds - self.offset,
            timeout=self.settings.federation.round_timeout,
            evaluate_fn=lambda r, arrays: self.end_round(r + self.offset, arrays),
        )

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate, record, check, sign, checkpoint (Flower's server-side evaluation hook)."""
        if (self.resumed and server_round == self.offset) or self.strategy.stop_code == STOP_CODE:
            return None  # evaluated and recorded before the interruption, or the run has diverged
        result = self.evaluate(arrays)
        self.record(server_round, result)
        self.check(server_round, result, arrays)
        self.sign()
        self.checkpoint(server_round, arrays)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    def evaluate(self, arrays: ArrayRecord) -> EvalResult:
        return self.held_out.evaluate(record_to_arrays(arrays))

    def record(self, server_round: int, result: EvalResult) -> None:
        """The round's line of metrics.jsonl (and its CSV row and TensorBoard scalars)."""
        s = self.strategy
        row = RoundLine(server_round, s.outcomes.get(server_round, ()), s.evaluations.get(server_round, ()), result,
                        self.held_out.test.label_names).to_row()
        if self.secure is not None:
            row |= self.secure.round_fields(server_round, self.settings.privacy.delta)
        line = self.recorder.record_round(row)
        log.info("round %s: held-out accuracy %.4f, loss %.4f, max epsilon %s", server_round, result.accuracy,
                 result.loss, line["epsilon-max"])

    def check(self, server_round: int, result: EvalResult, arrays: ArrayRecord) -> None:
        """The divergence guard: stop the run (keeping the last adapter before), or keep this round's adapter."""
        why = self.guard.check(server_round, result.loss, self.strategy.outcomes.get(server_round, ()))
        if why is None:
            self.kept = Kept(server_round, arrays)
            return
        self.strategy.stop(STOP_CODE, diverged_reason(why, kept_round=self.kept.server_round,
                                                      private=self.settings.privacy.dp,
                                                      epsilon=spent_epsilon(self.recorder.rounds)))

    def sign(self) -> None:
        """The run record: a receipt for every reply so far, signed with the server's record key."""
        client_level = self.secure.client_level(self.settings.privacy.delta) if self.secure is not None else None
        write_record(self.results_dir, self.run_id, self.key, self.strategy.outcomes, self.signing,
                     client_level=client_level)

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        if self.store is None:
            return
        self.store.save(Checkpoint(
            server_round=server_round, run_key=self.key, arrays=record_to_arrays(arrays),
            outcomes=self.strategy.outcomes, evaluations=self.strategy.evaluations,
            metrics_lines=self.recorder.rounds, first_started=self.first_started,
        ))
