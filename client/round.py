"""One local training round: budget check, charge, DP-SGD, adapter out.

The order is the privacy contract: plan noise (first round), project epsilon
after this round, refuse if it would pass the budget, otherwise persist the
charge, *then* train. A crash after the charge wastes budget but never releases
an unpaid update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedtune.client.node_data import NodeData
from fedtune.client.privacy import PrivacyState, PrivacyStore, plan_noise, steps_per_round
from fedtune.client.trainer import DpParams, train
from fedtune.common.adapter import Arrays, load_arrays, to_arrays
from fedtune.common.device import pick_device
from fedtune.common.errors import ModelError
from fedtune.common.model import build_model, load_base
from fedtune.common.settings import RunSettings

# Slack for comparing a planned epsilon with the budget (accountant round-off).
BUDGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RoundOutcome:
    """What a node replies after a training request."""

    arrays: Arrays | None  # None when the node refused to train
    metrics: dict[str, float]
    reason: str = ""


def _noise_for(state: PrivacyState, settings: RunSettings, q: float, steps: int, server_round: int) -> float:
    """The run's noise multiplier, planned once so the remaining rounds spend the remaining budget."""
    if state.noise_multiplier is None:
        rounds_left = max(1, settings.plan.num_rounds - server_round + 1)
        remaining = state.budget - state.epsilon()
        state.noise_multiplier = plan_noise(
            remaining, settings.privacy.delta, q, steps * rounds_left, settings.privacy.accountant
        )
    return state.noise_multiplier


def train_round(
    settings: RunSettings, data: NodeData, global_arrays: Arrays, *, server_round: int,
    state_dir: Path, seed: int,
) -> RoundOutcome:
    """Run one round of local training under the node's privacy budget."""
    q, steps = steps_per_round(data.num_train, settings.plan.batch_size, settings.plan.local_epochs)
    metrics: dict[str, float] = {"num-examples": data.num_train, "steps": steps, "sample-rate": q}
    dp = None
    if settings.privacy.dp:
        store = PrivacyStore(state_dir / "privacy.json")
        state = store.load(settings.privacy.accountant, settings.privacy.delta, settings.privacy.epsilon)
        sigma = _noise_for(state, settings, q, steps, server_round)
        before = state.epsilon()
        after = state.projected((sigma, q, steps))
        metrics |= {"noise-multiplier": sigma, "epsilon-before": before, "epsilon-budget": state.budget}
        if after > state.budget + BUDGET_TOLERANCE:
            reason = f"budget: epsilon would reach {after:.4f} > budget {state.budget:.4f}"
            return RoundOutcome(None, metrics | {"refused": 1, "epsilon": before, "epsilon-round": 0.0}, reason)
        state.history.append((sigma, q, steps))
        store.save(state)  # the charge is on disk before any gradient is computed
        metrics |= {"epsilon": after, "epsilon-round": after - before}
        dp = DpParams(noise_multiplier=sigma, clip_norm=settings.privacy.clip_norm)
    else:
        metrics |= {"epsilon": math.inf, "epsilon-round": math.inf, "noise-multiplier": 0.0}

    device = pick_device()
    model = build_model(load_base(settings.model.model_path), len(data.label_names), settings.lora, device,
                        seed=settings.plan.seed)
    load_arrays(model, global_arrays)
    result = train(model, data.train, steps=steps, batch_size=settings.plan.batch_size,
                   learning_rate=settings.plan.learning_rate, dp=dp, device=device, seed=seed)
    update = to_arrays(model)
    if not any(np.any(update[k] != global_arrays[k]) for k in update):
        raise ModelError("training left every adapter tensor unchanged (see opacus#820); refusing to reply")
    return RoundOutcome(update, metrics | {"train-loss": result.loss, "refused": 0})


def seed_for(base_seed: int, server_round: int, node_key: int) -> int:
    """Distinct, reproducible seed per (run seed, round, node); int tuple hashes are not salted."""
    return hash((base_seed, server_round, node_key)) % (2**31 - 1)
