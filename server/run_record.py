"""The server's signed run record: one receipt per node and round, naming the node's ledger head.

Every training reply carries the node's ledger key, the line it wrote for the round and that line's hash.
After each round the ServerApp signs all receipts so far (``RUN_DIR/run-record.json``) with its record
key, so ``fedtune-audit --server-record RUN_DIR --server-key server-record.pub`` can show that a node's
ledger was not truncated or rolled back after the server saw it. Each receipt keeps the node's own
signature over it (``node-sig``) and the Flower run id of the attempt that got the reply. The receipts
are rebuilt from the strategy's per-round rows, which checkpoints keep, so a resumed run's record holds
every round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common import runtime
from fedtune.common.ledger.key import load_or_create_key, public_path
from fedtune.common.ledger.receipts import RECORD_KEY_FILE, Receipt, RunRecord, write_run_record

log = logging.getLogger("fedtune.server")
PUBLIC_FILE = "server-record.pub"


def record_key(results_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The server's record key (created on first use); its public half is copied into the results."""
    path = runtime.path(runtime.RECORD_KEY) or results_dir / RECORD_KEY_FILE
    key = load_or_create_key(path)
    (results_dir / PUBLIC_FILE).write_bytes(public_path(path).read_bytes())
    return key


def receipts(train_rows: Mapping[int, list[dict[str, Any]]]) -> list[Receipt]:
    """A receipt for every reply that named a ledger head (trained, refused, or rejected for its update).

    The wire contract validates every field a receipt holds, so every accepted reply makes a valid one; a
    row that does not raises PrivacyError. Rows restored from a checkpoint written before nodes signed their
    replies (no ``node-sig``) make no receipt: a format-2 record only holds receipts the node signed. Each is
    logged.
    """
    out = []
    for server_round in sorted(train_rows):
        for row in train_rows[server_round]:
            if not {"ledger-key", "ledger-seq", "ledger-head"} <= set(row):
                continue
            node = row.get("node") or str(row["node-id"])
            if "node-sig" not in row:
                log.warning("round %s, node %s: a reply recorded before nodes signed their replies (an older "
                            "checkpoint); it has no receipt in the run record", server_round, node)
                continue
            out.append(Receipt(server_round, node, row["ledger-key"], int(row["ledger-seq"]), row["ledger-head"],
                               row["status"], run=row["run"], node_sig=row["node-sig"]))
    return out


def write_record(results_dir: Path, run_id: str, run_key: str, train_rows: Mapping[int, list[dict[str, Any]]],
                 key: ed25519.Ed25519PrivateKey) -> Path:
    return write_run_record(results_dir, RunRecord(run_id, run_key, tuple(receipts(train_rows))), key)
