"""``fedtune-sim --central``: the central baseline, on the same split as the federated run.

One node holds the union of the clients' training data: the training pool that ``fedtune-sim`` would
partition between the simulated nodes (:func:`fedtune.common.data.table.federation_split`, the same seed, cap
and held-out set). It is prepared like any simulated node (:func:`fedtune.sim.nodes.prepare` with one
client: data file, policy, ledger key, roster) and trains through the node's own code path
(:func:`fedtune.client.round.train_round`): policy check, noise planned by the node's accountant over the
whole run, a signed ledger charge before each round, then the real trainer. Under DP the central node has
its own budget (the run's epsilon and delta), so central DP and federated DP spend the same epsilon per
dataset. The server side is the ServerApp's: same initial adapter, same held-out evaluation, same
divergence guard, and the same results directory (metrics.jsonl, summary.json, adapter/, report), with
``"mode": "central"`` in the summary. No Flower processes are started.

A "round" here is ``local-epochs`` expected passes over the pool, so ``num-rounds`` rounds see each
training example as often as the federated run does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.node_config import NodeConfig
from fedtune.client.policy import load_policy
from fedtune.client.round import NodePrivacy, train_round
from fedtune.common import runtime
from fedtune.common.errors import FedtuneError, ModelError
from fedtune.common.models.adapter import AdapterMeta, save_adapter, to_arrays
from fedtune.common.models.card import write_model_card
from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import Arrays
from fedtune.common.wire.contract import RoundRequest
from fedtune.server.checkpoint import run_key
from fedtune.server.divergence import STOP_CODE, DivergenceGuard, diverged_reason, spent_epsilon
from fedtune.server.evaluation import HeldOut
from fedtune.server.outcome import NodeOutcome
from fedtune.server.results import ADAPTER_DIR, RunRecorder, card_info
from fedtune.server.round_line import RoundLine
from fedtune.sim.nodes import SimulatedNodes, prepare

CENTRAL_NODE = 0  # the central node's partition id (its files are clients/client-0/)


@dataclass
class _Outcome:
    stop_code: str | None = None
    stop_reason: str | None = None
    kept_round: int = 0  # the round whose adapter is saved (the last one before a divergence)


def _node(env: dict[str, str]) -> tuple[NodeConfig, NodePrivacy]:
    raw = json.loads(Path(env[runtime.SIM_NODES.name]).read_text())[str(CENTRAL_NODE)]
    config = NodeConfig.parse(raw, simulated=True)
    policy = load_policy(config.policy)
    return config, NodePrivacy.open(policy, config.state_dir, node=config.node, witness=config.witness)


def _train(request: RoundRequest, arrays: Arrays, config: NodeConfig, node: NodePrivacy,
           run_id: str) -> tuple[NodeOutcome, Arrays | None]:
    """One central round through the node's code path; a non-finite update is an error with code TRAIN."""
    try:
        reply, update = train_round(request, arrays, config=config, node=node, run_id=run_id)
    except ModelError as err:
        if err.code != "TRAIN":
            raise
        return NodeOutcome(CENTRAL_NODE, "error", err.code), None
    return NodeOutcome(CENTRAL_NODE, reply.status, reply.code, reply=reply), update


class CentralRun:
    """The central training loop; ``on_round(round, line)`` is called after each evaluation (progress)."""

    def __init__(self, settings: RunSettings, nodes: SimulatedNodes) -> None:
        self.settings = settings
        self.out = nodes.out
        self.env = prepare(settings, nodes)
        self.held_out = HeldOut.build(settings)
        self.task, self.model, self.test = self.held_out.task, self.held_out.model, self.held_out.test
        self.recorder = RunRecorder(self.out)

    def _evaluate(self, server_round: int, arrays: Arrays, outcomes: list[NodeOutcome]) -> dict[str, Any]:
        result = self.held_out.evaluate(arrays)
        return self.recorder.record_round(RoundLine(server_round, outcomes, [], result,
                                                    self.test.label_names).to_row())

    def run(self, on_round: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        s = self.settings
        config, node = _node(self.env)
        request = RoundRequest(server_round=1, run_key=run_key(s.to_config()), resumed_after_round=0,
                               labels=tuple(self.test.label_names), model=s.model, lora=s.lora, plan=s.plan,
                               privacy=s.privacy)
        run_id = f"central-{time.strftime('%Y%m%d-%H%M%S')}-{s.federation.seed}"
        guard = DivergenceGuard(s.federation.divergence_factor)
        arrays = kept = to_arrays(self.model)
        outcome = _Outcome()
        for server_round in range(s.plan.num_rounds + 1):
            outcomes: list[NodeOutcome] = []
            if server_round:
                node_outcome, update = _train(request.for_round(server_round), arrays, config, node, run_id)
                outcomes, arrays = [node_outcome], update if update is not None else arrays
            line = self._evaluate(server_round, arrays, outcomes)
            if on_round is not None:
                on_round(server_round, line)
            if stop := self._stop(guard, server_round, line, outcomes, outcome.kept_round):
                outcome = stop
                break
            kept, outcome.kept_round = arrays, server_round
        return self._finish(kept, outcome)

    def _stop(self, guard: DivergenceGuard, server_round: int, line: dict[str, Any], outcomes: list[NodeOutcome],
              kept_round: int) -> _Outcome | None:
        """Why the run stops after this round (diverged, or the node refused), or None."""
        loss = line["loss"] if line.get("loss") is not None else math.nan  # the recorder wrote NaN as null
        if why := guard.check(server_round, loss, outcomes):
            return _Outcome(STOP_CODE, diverged_reason(why, kept_round=kept_round, private=self.settings.privacy.dp,
                                                       epsilon=spent_epsilon(self.recorder.rounds)), kept_round)
        if outcomes and outcomes[0].status == "refused":
            return _Outcome("budget", f"stopped after round {server_round}: the central node refused to train "
                                      f"({outcomes[0].code}); see its ledger", kept_round)
        return None

    def _finish(self, kept: Arrays, outcome: _Outcome) -> dict[str, Any]:
        s = self.settings
        meta = AdapterMeta(self.task.base_ref(s.model.model_path, s.model.base_model_id), self.test.label_names,
                           s.model.max_seq_len, self.task.name)
        adapter_dir = save_adapter(self.model, kept, self.out / ADAPTER_DIR, meta=meta)
        status = {"status": "stopped-early", "stop-code": outcome.stop_code, "stop-reason": outcome.stop_reason} \
            if outcome.stop_code else {"status": "completed"}
        rounds = self.recorder.rounds
        summary = self.recorder.finish({"mode": "central", "adapter": ADAPTER_DIR, "adapter-round": outcome.kept_round,
                                        **status, **self.task.summary_fields(self.test, rounds),
                                        "task": self.task.name, "settings": s.to_config()})
        write_model_card(adapter_dir, card_info(meta, s, rounds, status["status"]))
        return summary


def run_central(settings: RunSettings, nodes: SimulatedNodes,
                on_round: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the central baseline into ``nodes.out``; returns the summary. FedtuneError for an operator mistake."""
    if nodes.num_clients != 1:
        raise FedtuneError(f"the central baseline has one node, got {nodes.num_clients}")
    return CentralRun(settings, nodes).run(on_round)
