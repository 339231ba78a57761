"""One local training round, in the order that keeps everything but the DP update independent of the rows.

1. **Request checks** (``client/admission.py``): the request against the node's declaration (task, labels)
   and policy (DP, delta, allowed model, sequence length); then the allowed base model is loaded and the
   server's adapter checked. A function of the request and the node's configuration only.
2. **The rows**: read against the node's own declaration (a bad row is left out and logged, never failing the
   round); only N leaves the node (a disclosed leak: it sets q and the steps).
3. **The charge**, under the ledger's lock: plan noise (first round of a run), project the dataset's cumulative
   epsilon, and append a signed entry — ``refused`` with the reason, or ``charged`` — fsync'd *before* any
   gradient is computed. Identical refusals are coalesced so that a server cannot fill the ledger with them.
4. **Training**: after the charge the only output that depends on the rows is the DP-protected update. Any
   failure here is answered with the one code ``TRAIN``, whatever its cause (the node logs the detail).

The budget key is the policy's ``dataset-id``; the randomness is the node's own (``client/randomness.py``);
the reply is a ``fedtune.common.wire.contract`` type, so only its fields leave the node.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import PeftModel

from fedtune.client.admission import plan_without_rows, ready_model, refusals
from fedtune.client.budget import Decision, decide, epsilon_of
from fedtune.client.node_config import NodeConfig
from fedtune.client.node_data import NodeRows, load_rows, train_inputs
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, train
from fedtune.common.errors import ConfigError, ModelError
from fedtune.common.ledger.entry import AccountantRecord, LedgerHeader, RoundEntry
from fedtune.common.ledger.key import KEY_FILE, load_or_create_key
from fedtune.common.ledger.receipts import sign_receipt
from fedtune.common.ledger.store import LEDGER_FILE, Ledger, LedgerSession
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.device import pick_device
from fedtune.common.privacy.accountant import steps_per_round
from fedtune.common.tasks import get_task
from fedtune.common.wire.arrays import Arrays, sent_arrays
from fedtune.common.wire.contract import RoundRequest, TrainReply

log = logging.getLogger("fedtune.client")
# New refusal lines a ledger takes per 24 hours; beyond it a refusal cites the newest refusal line instead of
# writing one (a server sending one odd request after another cannot fill the ledger to its size limit).
MAX_REFUSALS_PER_DAY = 100


class ChargedRoundFailed(ModelError):
    """A charged round failed before it could reply: one code whatever the cause (the detail is in the log)."""

    default_code = "TRAIN"


@dataclass(frozen=True)
class RunRef:
    """Which run a round belongs to: noise is planned once per run and reused for its later rounds."""

    run_id: str  # Flower's run id (new for every submitted run)
    run_key: str = ""  # the server's settings hash; a resumed server run keeps it
    resumed: bool = False  # the server resumed this run from a checkpoint (new run id, same run)

    def owns(self, entry: RoundEntry) -> bool:
        return entry.run == self.run_id or (self.resumed and bool(self.run_key) and entry.run_key == self.run_key)


@dataclass(frozen=True)
class NodePrivacy:
    """The node's policy and its signed ledger (on the node's own disk)."""

    policy: NodePolicy
    ledger: Ledger

    @classmethod
    def open(cls, policy: NodePolicy, state_dir: Path, *, node: str = "", witness: Path | None = None) -> NodePrivacy:
        """Ledger at ``state_dir/ledger.jsonl``; key from the policy or ``state_dir``, created on first use.

        With ``node`` (the node's identity) the ledger is bound to it and to the policy by a signed header;
        with ``witness`` a ledger found behind its witness (truncated, or restored from an old copy) is refused.
        """
        if not policy.dataset_id:
            raise ConfigError(f"{policy.source}: dataset-id is required (the budget key; the server cannot set it)")
        key_path = Path(policy.ledger_key) if policy.ledger_key else state_dir / KEY_FILE
        header = LedgerHeader(node, policy.dataset_id, policy.max_epsilon, policy.delta, policy.accountant) \
            if node else None
        return cls(policy, Ledger(state_dir / LEDGER_FILE, load_or_create_key(key_path), header=header,
                                  witness=witness))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _round_entry(decision: Decision, request: PlanRequest, policy: NodePolicy, *, run: RunRef,
                 fingerprint: str, rng: str) -> RoundEntry:
    return RoundEntry(
        run=run.run_id, run_key=run.run_key, round=request.server_round,
        dataset=policy.dataset_id, fingerprint=fingerprint, rng=rng, released=policy.released,
        decision="charged" if decision.charged else "refused", reason=decision.reason,
        event=decision.event, delta=policy.delta,
        accountant=AccountantRecord.of(policy.accountant), epsilon=_finite(decision.epsilon_after),
        epsilon_round=_finite(decision.epsilon_after - decision.epsilon_before)
        if math.isfinite(decision.epsilon_before) else None,
        projected=_finite(decision.projected), budget=decision.budget,
        request={"epsilon": request.epsilon, "delta": request.delta, "num_rounds": request.num_rounds,
                 "local_steps": request.steps, "sample_rate": request.sample_rate, "dp": request.dp,
                 "dp_mode": request.dp_mode,
                 "clip_norm": request.clip_norm, "accountant": request.accountant, "model": request.model,
                 "max_seq_len": request.max_seq_len},
    )


def charge_round(node: NodePrivacy, request: PlanRequest, *, run: RunRef, fingerprint: str,
                 rng: str = "secrets", refusal: tuple[str, str] | None = None) -> tuple[Decision, RoundEntry]:
    """Decide and record one round atomically (under the ledger's lock); the entry is on disk on return.

    ``refusal`` (code, reason): refused by the request checks before the rows were read. A refusal identical to
    one already recorded for this run, or beyond MAX_REFUSALS_PER_DAY, returns that earlier entry instead of
    appending a new one (its receipt is what the reply cites). The entry is returned sealed.
    """
    key = node.policy.dataset_id
    with node.ledger.session() as session:
        mine = [e for e in session.entries if e.dataset == key]
        charged = [e for e in mine if e.decision == "charged"]
        history = [e.event for e in charged]
        if refusal is not None:
            before = epsilon_of(history, node.policy.delta, node.policy.accountant)
            decision = Decision(False, "policy: " + refusal[1], refusal[0], None, before, before, None,
                                node.policy.max_epsilon, False)
        else:
            run_sigma = next((e.event.noise_multiplier for e in reversed(charged)
                              if run.owns(e) and e.event is not None), None)
            decision = decide(node.policy, request, history, run_sigma)
        if not decision.charged and (earlier := _coalesced(session, run, decision.reason)) is not None:
            return decision, earlier
        entry = session.append(_round_entry(decision, request, node.policy, run=run, fingerprint=fingerprint,
                                            rng=rng))
    return decision, entry


def _coalesced(session: LedgerSession, run: RunRef, reason: str) -> RoundEntry | None:
    """The earlier refusal entry a new refusal is folded into, if any: the same run and reason, or the newest
    refusal once the ledger took MAX_REFUSALS_PER_DAY of them in the last 24 hours."""
    refused = [e for e in session.entries if e.decision == "refused"]
    same = next((e for e in reversed(refused) if e.run == run.run_id and e.reason == reason), None)
    if same is not None or not refused:
        return same
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    recent = sum(dt.datetime.fromisoformat(e.sealed.time) >= since for e in refused[-MAX_REFUSALS_PER_DAY:])
    return refused[-1] if recent >= MAX_REFUSALS_PER_DAY else None


def _round_cost(decision: Decision) -> float:
    if not decision.charged:
        return 0.0
    return math.inf if math.isinf(decision.epsilon_after) else decision.epsilon_after - decision.epsilon_before


def _reply(decision: Decision, entry: RoundEntry, num_examples: int, node: str, train_loss: float | None = None, *,
           key: Ed25519PrivateKey, run_id: str, server_round: int) -> TrainReply:
    """The typed reply, with the node's signature (its ledger key) over the receipt the server will keep."""
    event = decision.event
    status: Literal["trained", "refused"] = "trained" if decision.charged else "refused"
    seq, head = entry.sealed.seq, entry.sealed.hash
    return TrainReply(
        status=status, code=decision.code, num_examples=num_examples,
        epsilon=decision.epsilon_after,
        epsilon_round=_round_cost(decision),
        epsilon_budget=decision.budget, noise_multiplier=event.noise_multiplier if event is not None else 0.0,
        exhausted=decision.exhausted, ledger_key=entry.sealed.key, ledger_seq=seq, ledger_head=head,
        node_sig=sign_receipt(key, run=run_id, round=server_round, seq=seq, head=head, status=status),
        node=node, train_loss=train_loss)


def plan_request(request: RoundRequest, num_examples: int) -> PlanRequest:
    """The privacy-relevant part of the server's request, with this node's sampling rate and steps."""
    q, steps = steps_per_round(num_examples, request.plan.batch_size, request.plan.local_epochs)
    return dataclasses.replace(plan_without_rows(request), sample_rate=q, steps=steps)


@dataclass(frozen=True)
class OptimizerChoice:
    kind: str  # sgd | adamw
    learning_rate: float  # of the head; LoRA factors get learning_rate x lora_lr_scale
    lora_lr_scale: float


def training_mode(decision: Decision, request: RoundRequest) -> tuple[DpParams | None, OptimizerChoice]:
    """How a charged round trains: DP-SGD with the planned noise; clip-only: the same pipeline and optimiser with
    noise 0 (the ledger charged it as unbounded epsilon); off: no clipping, the non-private optimiser."""
    plan = request.plan
    dp_optimizer = OptimizerChoice(plan.optimizer, plan.learning_rate, plan.lora_lr_scale)
    if decision.event is not None:
        return DpParams(decision.event.noise_multiplier, decision.event.clip_norm), dp_optimizer
    if request.privacy.dp_mode == "clip-only":
        return DpParams(0.0, request.privacy.clip_norm), dp_optimizer
    return None, OptimizerChoice(plan.nonprivate_optimizer, plan.nonprivate_learning_rate,
                                 plan.nonprivate_lora_lr_scale)


def round_seeds(config: NodeConfig, server_round: int) -> RoundSeeds:
    if config.insecure_seed is not None and config.simulated:
        return RoundSeeds.insecure(config.insecure_seed, server_round, config.node)
    return RoundSeeds.secret()


def train_round(request: RoundRequest, global_arrays: Arrays, *, config: NodeConfig, node: NodePrivacy,
                run_id: str) -> tuple[TrainReply, Arrays | None]:
    """Run one round of local training under the node's policy and privacy budget (steps 1-4 above)."""
    run = RunRef(run_id, request.run_key, resumed=request.resumed_after_round > 0)
    seeds = round_seeds(config, request.server_round)
    if problems := refusals(request, node.policy, config):
        code, reason = problems[0][0], "; ".join(p for _, p in problems)
        decision, entry = charge_round(node, plan_without_rows(request), run=run, fingerprint="", rng=seeds.kind,
                                       refusal=(code, reason))
        return _reply(decision, entry, 0, config.node, key=node.ledger.key, run_id=run_id,
                      server_round=request.server_round), None
    task = get_task(request.model.task)
    device = pick_device()
    model = ready_model(task, request, global_arrays, device)
    rows = load_rows(config, request.labels, local_eval=node.policy.release_local_eval)
    plan = plan_request(request, rows.num_train)
    decision, entry = charge_round(node, plan, run=run, fingerprint=rows.fingerprint, rng=seeds.kind)
    if not decision.charged:
        return _reply(decision, entry, 0, config.node, key=node.ledger.key, run_id=run_id,
                      server_round=request.server_round), None
    try:
        update, loss = _train_charged(request, decision, rows, model, global_arrays, node.policy,
                                      steps=plan.steps or 0, seeds=seeds)
    except Exception as err:  # noqa: BLE001 - after the charge every failure looks the same to the server
        log.exception("round %s was charged (ledger line %s) and then failed", request.server_round, entry.sealed.seq)
        raise ChargedRoundFailed(f"round {request.server_round} failed after its charge: {err}") from err
    reply = _reply(decision, entry, rows.num_train, config.node, loss if node.policy.release_train_loss else None,
                   key=node.ledger.key, run_id=run_id, server_round=request.server_round)
    return reply, sent_arrays(update, request.lora.lora_variant)


def _train_charged(request: RoundRequest, decision: Decision, rows: NodeRows, model: PeftModel,
                   global_arrays: Arrays, policy: NodePolicy, *, steps: int,
                   seeds: RoundSeeds) -> tuple[Arrays, float | None]:
    """DP-SGD on the node's rows from the server's adapter; the update and the (finite) mean training loss."""
    dp, optimizer = training_mode(decision, request)
    device = next(model.parameters()).device
    data = train_inputs(rows, request.model.model_path, request.model.max_seq_len, request.lora)
    result = train(model, data, steps=steps, batch_size=request.plan.batch_size,
                   learning_rate=optimizer.learning_rate, dp=dp, device=device, seeds=seeds,
                   optimizer=optimizer.kind, lora_lr_scale=optimizer.lora_lr_scale, task=get_task(request.model.task),
                   fixed_shape=policy.fixed_shape, head_only=request.server_round <= request.plan.head_rounds)
    update = to_arrays(model)
    if not all(np.all(np.isfinite(v)) for v in update.values()):
        raise ModelError("training diverged: the update holds NaN or inf (lower the learning rate)")
    if not any(np.any(update[k] != global_arrays[k]) for k in update):
        raise ModelError("training left every adapter tensor unchanged (see opacus#820); refusing to reply")
    return update, result.loss if math.isfinite(result.loss) else None
