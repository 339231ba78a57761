"""The server's signed run record: one receipt per node and round, naming the node's ledger head.

Every training reply carries the node's ledger key, the line it wrote for the round and that line's hash.
After each round the ServerApp signs all receipts so far (``RUN_DIR/run-record.json``) with its record
key, so ``fedtune-audit --server-record RUN_DIR --server-key server-record.pub`` can show that a node's
ledger was not truncated or rolled back after the server saw it. The receipts are rebuilt from the
strategy's per-round rows, which checkpoints keep, so a resumed run's record holds every round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger_key import load_or_create_key, public_path
from fedtune.common.receipts import RECORD_KEY_FILE, Receipt, RunRecord, write_run_record

ENV_RECORD_KEY = "FEDTUNE_RECORD_KEY"  # set by fedtune-server (WORK_DIR/server-record.key) and fedtune-sim
PUBLIC_FILE = "server-record.pub"


def record_key(results_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The server's record key (created on first use); its public half is copied into the results."""
    path = Path(os.environ.get(ENV_RECORD_KEY) or results_dir / RECORD_KEY_FILE)
    key = load_or_create_key(path)
    (results_dir / PUBLIC_FILE).write_bytes(public_path(path).read_bytes())
    return key


def receipts(train_rows: Mapping[int, list[dict[str, Any]]]) -> list[Receipt]:
    """A receipt for every reply that named a ledger head (trained, refused, or rejected for its update)."""
    out = []
    for server_round in sorted(train_rows):
        for row in train_rows[server_round]:
            if not {"ledger-key", "ledger-seq", "ledger-head"} <= set(row):
                continue
            try:
                out.append(Receipt(server_round, row.get("node") or str(row["node-id"]), row["ledger-key"],
                                   int(row["ledger-seq"]),
                                   row["ledger-head"], row["status"]))
            except PrivacyError:  # a malformed head: the reply was already rejected, nothing to vouch for
                continue
    return out


def write_record(results_dir: Path, run_id: str, run_key: str, train_rows: Mapping[int, list[dict[str, Any]]],
                 key: ed25519.Ed25519PrivateKey) -> Path:
    return write_run_record(results_dir, RunRecord(run_id, run_key, tuple(receipts(train_rows))), key)
