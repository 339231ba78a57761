"""The server's signed run record: one receipt per node and round, naming the node's ledger head.

Every training reply carries the node's ledger key, the line it wrote for the round and that line's hash.
After each round the ServerApp signs all receipts so far (``RUN_DIR/run-record.json``) with its record
key, so ``fedtune-audit --server-record RUN_DIR --server-key server-record.pub`` can show that a node's
ledger was not truncated or rolled back after the server saw it. Each receipt keeps the node's own
signature over it (``node-sig``) and the Flower run id of the attempt that got the reply. The receipts
are built from the round's typed outcomes (:class:`~fedtune.server.outcome.NodeOutcome`), which checkpoints
keep, so a resumed run's record holds every round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common import runtime
from fedtune.common.ledger.key import load_or_create_key, public_path
from fedtune.common.ledger.receipts import RECORD_KEY_FILE, Receipt, RunRecord, write_run_record
from fedtune.server.outcome import NodeOutcome

log = logging.getLogger("fedtune.server")
PUBLIC_FILE = "server-record.pub"


def record_key(results_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The server's record key (created on first use); its public half is copied into the results."""
    path = runtime.path(runtime.RECORD_KEY) or results_dir / RECORD_KEY_FILE
    key = load_or_create_key(path)
    (results_dir / PUBLIC_FILE).write_bytes(public_path(path).read_bytes())
    return key


def receipts(outcomes: Mapping[int, Sequence[NodeOutcome]]) -> list[Receipt]:
    """A receipt for every reply that named a ledger head (trained, refused, or rejected for its update).

    The wire contract validates every field a receipt holds, so every accepted reply makes a valid one; one
    that does not raises PrivacyError. Outcomes restored from a checkpoint written before nodes signed their
    replies (no node signature) make no receipt: a format-2 record only holds receipts the node signed. Each is
    logged.
    """
    out = []
    for server_round in sorted(outcomes):
        for outcome in outcomes[server_round]:
            if (receipt := _receipt(server_round, outcome)) is not None:
                out.append(receipt)
    return out


def _receipt(server_round: int, outcome: NodeOutcome) -> Receipt | None:
    reply = outcome.reply
    if reply is None:
        return None
    node = reply.node or str(outcome.node_id)
    if not reply.node_sig:
        log.warning("round %s, node %s: a reply recorded before nodes signed their replies (an older "
                    "checkpoint); it has no receipt in the run record", server_round, node)
        return None
    return Receipt(server_round, node, reply.ledger_key, reply.ledger_seq, reply.ledger_head, outcome.status,
                   run=outcome.run or "", node_sig=reply.node_sig)


def write_record(results_dir: Path, run_id: str, run_key: str, outcomes: Mapping[int, Sequence[NodeOutcome]],
                 key: ed25519.Ed25519PrivateKey, *, client_level: Mapping[str, Any] | None = None) -> Path:
    """Sign and write the run record; ``client_level``: the aggregate's client-level DP (secure aggregation)."""
    record = RunRecord(run_id, run_key, tuple(receipts(outcomes)), client_level=client_level)
    return write_run_record(results_dir, record, key)
