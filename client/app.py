"""The fedtune ClientApp (Flower Message API): local DP-SGD training and, if the policy allows, evaluation.

Every handler parses the server's request through the wire contract and answers only with a wire
type. Any failure is logged here in full (the node's own log) and answered with a code: no exception
text, row, column name or path ever reaches the server (Flower would forward ``str(exception)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client.admission import ready_model, refusals
from fedtune.client.node_config import NodeConfig, node_config
from fedtune.client.node_data import load_rows, tensors
from fedtune.client.policy import NodePolicy, load_policy
from fedtune.client.round import NodePrivacy, train_round
from fedtune.client.secure_aggregation import SECURE, secure_aggregation_mod
from fedtune.common.errors import FedtuneError
from fedtune.common.models.device import pick_device
from fedtune.common.tasks import get_task
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST, ErrorReply, EvalReply, RoundRequest, WireError

log = logging.getLogger("fedtune.client")
app = ClientApp(mods=[secure_aggregation_mod])


def _answer(msg: Message, handler: Callable[[], RecordDict]) -> Message:
    """Run ``handler``; on any failure, log the detail locally and reply with a code only."""
    try:
        content = handler()
    except FedtuneError as err:
        log.error("round failed (code %s): %s", err.code, err)
        content = ErrorReply(err.code).to_content()
    except Exception:  # noqa: BLE001 - the privacy boundary: nothing of an unexpected error may leave the node
        log.exception("round failed with an unexpected error (code INTERNAL)")
        content = ErrorReply("INTERNAL").to_content()
    return Message(content, reply_to=msg)


def _request(msg: Message) -> RoundRequest:
    record = msg.content.config_records.get(REQUEST)
    if record is None or ARRAYS not in msg.content.array_records:
        raise WireError("the message has no request or no adapter")
    return RoundRequest.from_record(record)


def _node(context: Context) -> tuple[NodeConfig, NodePolicy]:
    config = node_config(context.node_config)
    return config, load_policy(config.policy)


@app.train()
def train(msg: Message, context: Context) -> Message:
    def handle() -> RecordDict:
        request = _request(msg)
        if request.aggregation.secure_aggregation != (SECURE in msg.content.config_records):
            raise WireError("the request's secure-aggregation does not match how the round arrived")
        config, policy = _node(context)
        reply, update = train_round(request, record_to_arrays(msg.content.array_records[ARRAYS]), config=config,
                                    node=NodePrivacy.open(policy, config.state_dir, node=config.node,
                                                          witness=config.witness), run_id=str(context.run_id))
        if update is None:
            log.warning("refused round %s: code %s", request.server_round, reply.code)
        return reply.to_content(None if update is None else arrays_to_record(update))

    return _answer(msg, handle)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    def handle() -> RecordDict:
        request = _request(msg)
        config, policy = _node(context)
        # The same checks, in the same order, as a training round: nothing before the rows depends on them.
        if not policy.release_local_eval or refusals(request, policy, config):
            return EvalReply("declined").to_content()
        task = get_task(request.model.task)
        device = pick_device()
        model = ready_model(task, request, record_to_arrays(msg.content.array_records[ARRAYS]), device)
        rows = load_rows(config, request.labels, local_eval=True)
        if len(rows.test.dataset) == 0:
            return EvalReply("declined").to_content()
        base = task.load_base(request.model.model_path)
        result = task.evaluate(model, base, rows.test, tensors(rows, "test", request.model.model_path,
                                                                request.model.max_seq_len), device=device)
        return EvalReply("evaluated", result.num_examples, result.loss, result.accuracy).to_content()

    return _answer(msg, handle)
