"""A node's reply message read into a typed outcome: the only place the server looks inside a reply.

Every reply is parsed with :func:`~fedtune.common.wire.contract.parse_reply` and becomes a
:class:`~fedtune.server.outcome.NodeOutcome`: trained, refused (policy or budget; no weights), error (a code
from the node, or Flower's own failure) or rejected (malformed, wrong shapes, NaN/inf). Nothing a node writes
outside the contract's fields reaches the server's records.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from flwr.common.constant import ErrorCode

from fedtune.common.wire.arrays import Arrays, check_arrays, record_to_arrays, sent_arrays, with_frozen
from fedtune.common.wire.contract import ARRAYS, ErrorReply, EvalReply, TrainReply, WireError, parse_reply
from fedtune.server.outcome import EvalOutcome, NodeOutcome

_FLOWER_CODES = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int) and not k.startswith("_")}


def flower_code(code: int) -> str:
    """A Flower error as a code (e.g. FLOWER_INVALID_FAB: the node's app gate refused the app)."""
    return f"FLOWER_{_FLOWER_CODES.get(code, code)}"


def reply_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def train_outcome(msg: Message, reference: Arrays, lora_variant: str = "lora", run_id: str = "",
                  ) -> tuple[NodeOutcome, Arrays | None]:
    """One training reply -> (its outcome, the arrays to aggregate or None).

    Under FFA-LoRA a node sends only what trains (B and the head); A is restored from ``reference``.
    A reply that names a ledger entry records ``run_id`` (this attempt's Flower run id) for its receipt.
    """
    node = msg.metadata.src_node_id
    if msg.has_error():  # Flower itself failed (app refused by the node's gate, process died, timeout)
        return NodeOutcome(node, "error", flower_code(msg.error.code)), None
    try:
        reply = parse_reply(msg.content)
    except WireError as err:
        return NodeOutcome(node, "rejected", err.code), None
    if isinstance(reply, ErrorReply):
        return NodeOutcome(node, "error", reply.code), None
    if not isinstance(reply, TrainReply):
        return NodeOutcome(node, "rejected", "MALFORMED"), None
    outcome = NodeOutcome(node, reply.status, reply.code, reply=reply, run=run_id)
    if reply.status != "trained":
        return outcome, None
    record = msg.content.array_records[ARRAYS]
    arrays = record_to_arrays(record)
    if check_arrays(arrays, sent_arrays(reference, lora_variant)):
        return NodeOutcome(node, "rejected", "BAD_UPDATE", reply=reply, run=run_id), None
    return NodeOutcome(node, "trained", "", reply=reply, received_bytes=reply_bytes(record), run=run_id), \
        with_frozen(arrays, reference)


def summed_outcome(msg: Message, run_id: str = "") -> tuple[NodeOutcome, int]:
    """A secure round's stage-2 reply -> (its outcome, the coordinates the node clamped).

    Under secure aggregation the update is inside the SecAgg+ sum: the reply carries the contract's fields
    only (no adapter), and a trained outcome has no arrays of its own.
    """
    node = msg.metadata.src_node_id
    if msg.has_error():
        return NodeOutcome(node, "error", flower_code(msg.error.code)), 0
    try:
        reply = parse_reply(msg.content, summed=True)
    except WireError as err:
        return NodeOutcome(node, "rejected", err.code), 0
    if isinstance(reply, ErrorReply):
        return NodeOutcome(node, "error", reply.code), 0
    if not isinstance(reply, TrainReply):
        return NodeOutcome(node, "rejected", "MALFORMED"), 0
    legacy = msg.content.config_records.get("fitres.metrics")
    clamped = legacy.get("clamped", 0) if legacy is not None else 0
    clamped = clamped if isinstance(clamped, int) and not isinstance(clamped, bool) and clamped >= 0 else 0
    return NodeOutcome(node, reply.status, reply.code, reply=reply, run=run_id), clamped


def eval_outcome(msg: Message) -> EvalOutcome | None:
    """A local-evaluation reply -> its outcome; None for a failed, malformed or declined one."""
    if msg.has_error():
        return None
    try:
        reply = parse_reply(msg.content, evaluation=True)
    except WireError:
        return None
    if not isinstance(reply, EvalReply) or reply.status != "evaluated" or reply.loss is None \
            or reply.accuracy is None:
        return None
    return EvalOutcome(msg.metadata.src_node_id, reply.num_examples, reply.loss, reply.accuracy)
