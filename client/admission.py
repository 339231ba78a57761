"""What a round request must pass before the node reads a row or charges its budget.

Every check here is a function of the request and of the node's own configuration (its policy, its
declaration of task and labels, its model files): never of its rows. So a refusal or an error sent at this
stage tells the server what the node's operator configured, and nothing about any example, however the
server crafts its requests (the label set, the task, the model, the sequence length, the weights).

- :func:`refusals`: the request against the declaration and the policy. A refusal is recorded in the ledger
  and answered with its code (``POLICY_*``).
- :func:`ready_model`: the base model the policy allows, with the server's adapter loaded after checking it
  (shapes, dtypes, finite after the cast to the model's dtype, bounded). A problem is answered with an error
  code (``MODEL``, ``BAD_REQUEST``) and leaves no ledger entry.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from fedtune.client.node_config import NodeConfig
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.common.errors import ModelError
from fedtune.common.models.adapter import load_arrays
from fedtune.common.models.base import kept_model, model_context
from fedtune.common.tasks import Task
from fedtune.common.wire.arrays import Arrays
from fedtune.common.wire.contract import RoundRequest, WireError


def plan_without_rows(request: RoundRequest) -> PlanRequest:
    """The privacy-relevant part of the request before the rows are read (no sampling rate, no steps yet)."""
    p = request.privacy
    return PlanRequest(
        model=request.model.model_path, dp=p.dp, epsilon=p.epsilon, delta=p.delta, accountant=p.accountant,
        num_rounds=request.plan.num_rounds, server_round=request.server_round, sample_rate=None, steps=None,
        clip_norm=p.clip_norm, dp_mode=p.dp_mode, max_seq_len=request.model.max_seq_len,
        secure=request.aggregation.secure_aggregation)


def refusals(request: RoundRequest, policy: NodePolicy, config: NodeConfig) -> list[tuple[str, str]]:
    """(code, detail) for every way the request departs from the node's declaration or policy; empty = go on."""
    out = []
    if request.model.task != config.task:
        out.append(("POLICY_TASK", f"the request is for task {request.model.task!r}; this node trains "
                                   f"{config.task!r}"))
    if len(request.labels) != len(config.labels) or set(request.labels) != set(config.labels):
        out.append(("POLICY_LABELS", f"the request names {len(request.labels)} label(s) "
                                     f"({', '.join(request.labels[:8])}); this node declared {len(config.labels)} "
                                     f"({', '.join(config.labels[:8])})"))
    return out + policy.request_problems(plan_without_rows(request))


def ready_model(task: Task, request: RoundRequest, arrays: Arrays, device: torch.device) -> PeftModel:
    """The node's kept model for this request with the server's adapter loaded (no row is touched).

    Call only after :func:`refusals` passed: the policy's allow-list decides which model is loaded at all.
    """
    base = task.load_base(request.model.model_path)
    if request.model.max_seq_len > (context := model_context(base)):
        raise WireError(f"max-seq-len {request.model.max_seq_len} is above the model's context of {context}")
    model = kept_model(task, request.model.model_path, request.labels, request.lora, device)
    try:
        load_arrays(model, arrays)
    except ModelError as err:
        raise WireError(err.problems) from err  # the server's tensors: BAD_REQUEST
    return model
