"""One local training round: policy check, budget check, signed charge, DP-SGD, adapter out.

The order is the privacy contract: under the ledger's lock, check the server's
plan against the node's policy, plan noise (first round of a run), project the
dataset's cumulative epsilon after this round, and append a signed entry —
``refused`` with the reason, or ``charged`` — fsync'd *before* any gradient is
computed. A crash after the charge wastes budget but never releases an unpaid
update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.client.node_data import NodeData
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.privacy import Decision, decide, steps_per_round
from fedtune.client.trainer import DpParams, train
from fedtune.common.accounting import accountant_record
from fedtune.common.adapter import Arrays, load_arrays, to_arrays
from fedtune.common.device import pick_device
from fedtune.common.errors import ModelError
from fedtune.common.ledger import LEDGER_FILE, Entry, Ledger, event_from_json, event_to_json
from fedtune.common.ledger_key import KEY_FILE, load_or_create_key
from fedtune.common.model import build_model, load_base
from fedtune.common.settings import RunSettings


@dataclass(frozen=True)
class RoundOutcome:
    """What a node replies after a training request."""

    arrays: Arrays | None  # None when the node refused to train
    metrics: dict[str, float]
    reason: str = ""


@dataclass(frozen=True)
class RunRef:
    """Which run a round belongs to: noise is planned once per run and reused for its later rounds."""

    run_id: str  # Flower's run id (new for every submitted run)
    run_key: str = ""  # the server's settings hash; a resumed server run keeps it
    resumed: bool = False  # the server resumed this run from a checkpoint (new run id, same run)

    def owns(self, entry: Entry) -> bool:
        return entry["run"] == self.run_id or (self.resumed and bool(self.run_key)
                                               and entry.get("run_key") == self.run_key)


@dataclass(frozen=True)
class NodePrivacy:
    """The node's policy and its signed ledger (on the node's own disk)."""

    policy: NodePolicy
    ledger: Ledger

    @classmethod
    def open(cls, policy: NodePolicy, state_dir: Path) -> NodePrivacy:
        """Ledger at ``state_dir/ledger.jsonl``; key from the policy or ``state_dir``, created on first use."""
        key_path = Path(policy.ledger_key) if policy.ledger_key else state_dir / KEY_FILE
        return cls(policy, Ledger(state_dir / LEDGER_FILE, load_or_create_key(key_path)))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _ledger_fields(decision: Decision, request: PlanRequest, policy: NodePolicy, *, run: RunRef,
                   fingerprint: str) -> dict[str, object]:
    return {
        "run": run.run_id, "run_key": run.run_key, "round": request.server_round,
        "dataset": policy.budget_key(fingerprint), "fingerprint": fingerprint,
        "decision": "charged" if decision.charged else "refused", "reason": decision.reason,
        "event": event_to_json(decision.event), "delta": policy.delta,
        "accountant": accountant_record(policy.accountant), "epsilon": _finite(decision.epsilon_after),
        "epsilon_round": _finite(decision.epsilon_after - decision.epsilon_before)
        if math.isfinite(decision.epsilon_before) else None,
        "projected": _finite(decision.projected), "budget": decision.budget,
        "request": {"epsilon": request.epsilon, "delta": request.delta, "num_rounds": request.num_rounds,
                    "local_steps": request.steps, "sample_rate": request.sample_rate, "dp": request.dp,
                    "clip_norm": request.clip_norm, "accountant": request.accountant, "model": request.model},
    }


def charge_round(node: NodePrivacy, request: PlanRequest, *, run: RunRef, fingerprint: str) -> tuple[Decision, Entry]:
    """Decide and record one round atomically (under the ledger's lock); the entry is on disk on return."""
    key = node.policy.budget_key(fingerprint)
    with node.ledger.session() as session:
        mine = [e for e in session.entries if e["dataset"] == key]
        charged = [e for e in mine if e["decision"] == "charged"]
        history = [event_from_json(e["event"]) for e in charged]
        run_sigma = next((float(e["event"]["noise_multiplier"]) for e in reversed(charged)
                          if run.owns(e) and e["event"] is not None), None)
        decision = decide(node.policy, request, history, run_sigma)
        entry = session.append(_ledger_fields(decision, request, node.policy, run=run, fingerprint=fingerprint))
    return decision, entry


def _metrics(decision: Decision, entry: Entry) -> dict[str, float]:
    event = decision.event
    return {
        "refused": 0 if decision.charged else 1, "exhausted": int(decision.exhausted),
        "epsilon": decision.epsilon_after, "epsilon-before": decision.epsilon_before,
        "epsilon-round": decision.epsilon_after - decision.epsilon_before if decision.charged else 0.0,
        "epsilon-budget": decision.budget, "epsilon-remaining": decision.budget - decision.epsilon_after,
        "noise-multiplier": event.noise_multiplier if event is not None else 0.0,
        "ledger-seq": int(entry["seq"]),
    }


def train_round(
    settings: RunSettings, data: NodeData, global_arrays: Arrays, *, server_round: int, run: RunRef,
    node: NodePrivacy, seed: int,
) -> RoundOutcome:
    """Run one round of local training under the node's policy and privacy budget."""
    q, steps = steps_per_round(data.num_train, settings.plan.batch_size, settings.plan.local_epochs)
    p = settings.privacy
    request = PlanRequest(
        model=settings.model.model_path, dp=p.dp, epsilon=p.epsilon, delta=p.delta, accountant=p.accountant,
        num_rounds=settings.plan.num_rounds, server_round=server_round, sample_rate=q, steps=steps,
        clip_norm=p.clip_norm,
    )
    decision, entry = charge_round(node, request, run=run, fingerprint=data.fingerprint)
    metrics: dict[str, float] = {"num-examples": data.num_train, "steps": steps, "sample-rate": q,
                                 **_metrics(decision, entry)}
    if not decision.charged:
        return RoundOutcome(None, metrics, decision.reason)
    dp = None if decision.event is None else DpParams(decision.event.noise_multiplier, decision.event.clip_norm)

    device = pick_device()
    model = build_model(load_base(settings.model.model_path), len(data.label_names), settings.lora, device,
                        seed=settings.plan.seed)
    load_arrays(model, global_arrays)
    result = train(model, data.train, steps=steps, batch_size=settings.plan.batch_size,
                   learning_rate=settings.plan.learning_rate, dp=dp, device=device, seed=seed,
                   optimizer=settings.plan.optimizer, lora_lr_scale=settings.plan.lora_lr_scale)
    update = to_arrays(model)
    if not any(np.any(update[k] != global_arrays[k]) for k in update):
        raise ModelError("training left every adapter tensor unchanged (see opacus#820); refusing to reply")
    return RoundOutcome(update, metrics | {"train-loss": result.loss})


def seed_for(base_seed: int, server_round: int, node_key: int) -> int:
    """Distinct, reproducible seed per (run seed, round, node); int tuple hashes are not salted."""
    return hash((base_seed, server_round, node_key)) % (2**31 - 1)
