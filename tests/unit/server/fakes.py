"""In-process stand-ins for nodes, answering a strategy's messages with real wire-contract replies."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Message, RecordDict

from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.receipts import sign_receipt
from fedtune.common.settings import RunSettings
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST, EvalReply, RoundRequest, TrainReply

SETTINGS = RunSettings()
REQUEST_TEMPLATE = RoundRequest(1, "k", 0, ("neg", "pos"), SETTINGS.model, SETTINGS.lora, SETTINGS.plan,
                                SETTINGS.privacy)
RUN_ID = "1"  # the Flower run id the fake nodes sign (the strategy's run_id in these tests)
NODE_KEY = ed25519.Ed25519PrivateKey.generate()  # the fake nodes' ledger key
LEDGER_KEY = key_id(NODE_KEY.public_key())


def node_sig(msg: Message, seq: int, head: str, status: str) -> str:
    return sign_receipt(NODE_KEY, run=RUN_ID, round=server_round(msg), seq=seq, head=head, status=status)


def server_round(msg: Message) -> int:
    return RoundRequest.from_record(msg.content.config_records[REQUEST]).server_round


def trained(msg: Message, arrays: dict, *, examples: int = 10, epsilon: float = 0.5, seq: int = 1,
            ledger_key: str = LEDGER_KEY) -> Message:
    reply = TrainReply("trained", "", examples, epsilon, epsilon, 8.0, 1.0, False, ledger_key, seq, "cd" * 32,
                       node_sig(msg, seq, "cd" * 32, "trained"))
    return Message(reply.to_content(arrays_to_record(arrays)), reply_to=msg)


def refused(msg: Message, code: str = "BUDGET_EXHAUSTED", *, epsilon: float = 7.9, seq: int = 2) -> Message:
    reply = TrainReply("refused", code, 10, epsilon, 0.0, 8.0, 0.9, True, LEDGER_KEY, seq, "ef" * 32,
                       node_sig(msg, seq, "ef" * 32, "refused"))
    return Message(reply.to_content(None), reply_to=msg)


def evaluated(msg: Message, examples: int = 10) -> Message:
    return Message(EvalReply("evaluated", examples, 1.0, 0.5).to_content(), reply_to=msg)


def shifted(msg: Message, delta: float) -> dict:
    return {k: v + delta for k, v in record_to_arrays(msg.content[ARRAYS]).items()}


def raw(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)
