"""Receipts: what the server saw of each node's ledger, signed, to catch rollback and truncation.

Every training reply carries the node's ledger head after that round: the ledger
key id (``ledger-key``), the entry's sequence number (``ledger-seq``) and its hash
(``ledger-head``). The server keeps one :class:`Receipt` per node and round in its
run record, ``RUN_DIR/run-record.json``: canonical JSON signed with the server's
Ed25519 record key (the same key format as the nodes' ledger keys; by default
``WORK_DIR/server-record.key`` next to the server's checkpoints, its public half
``server-record.pub`` is what auditors get).

A node's ledger must contain, at each receipt's line, exactly the entry whose hash
the node reported. A ledger that is shorter than a receipt was truncated or rolled
back to an older copy; one with other content at that line was rewritten after
the fact. :func:`cross_check` names the round, the node and the line.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.durable import write_atomically
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger import Problem, canonical, entry_hash, sign
from fedtune.common.ledger_key import key_id
from fedtune.common.ledger_schema import HEX64, KEY_ID, MAX_ID, DuplicateField, bad_numbers, loads, signature_problem

RECORD_FILE = "run-record.json"
RECORD_FORMAT = "fedtune-run-record/1"
RECORD_KEY_FILE = "server-record.key"
MAX_RECORD_BYTES = 32 * 1024 * 1024
Status = Literal["trained", "refused", "rejected", "error"]
STATUSES: tuple[str, ...] = ("trained", "refused", "rejected", "error")
# What a node's ledger entry at the receipt's line must say, by the server's view of the reply.
LEDGER_DECISION = {"trained": "charged", "refused": "refused"}


def _problems(**values: Any) -> list[str]:
    out = []
    for name, value in values.items():
        if name in ("round", "seq"):
            lo = 0 if name == "round" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 10**12:
                out.append(f"field '{name}' must be an integer >= {lo}, got {value!r}")
        elif not isinstance(value, str) or not value or len(value) > MAX_ID:
            out.append(f"field '{name}' must be a non-empty string of at most {MAX_ID} characters, got {value!r}")
        elif name == "ledger_key" and not KEY_ID.fullmatch(value):
            out.append(f"field 'ledger_key' must be an ed25519 key id, got {value!r}")
        elif name == "head" and not HEX64.fullmatch(value):
            out.append(f"field 'head' must be 64 hex digits, got {value!r}")
        elif name == "status" and value not in STATUSES:
            out.append(f"field 'status' must be one of {', '.join(STATUSES)}, got {value!r}")
    return out


@dataclass(frozen=True)
class Receipt:
    """The server's record that ``node`` replied in ``round`` with its ledger at (``ledger_key``, ``seq``, ``head``)."""

    round: int  # server round
    node: str  # how the server knows the node (its Flower node id, or its node identity)
    ledger_key: str  # ledger signing key id the node reported ("ed25519:...")
    seq: int  # line of the ledger entry the node wrote for this round
    head: str  # that entry's hash
    status: str  # trained | refused | rejected | error (the server's reading of the reply)

    def __post_init__(self) -> None:
        if problems := _problems(**self.fields()):
            raise PrivacyError([f"receipt for round {self.round!r}, node {self.node!r}: {p}" for p in problems])

    def fields(self) -> dict[str, Any]:
        return {"round": self.round, "node": self.node, "ledger_key": self.ledger_key, "seq": self.seq,
                "head": self.head, "status": self.status}


@dataclass(frozen=True)
class RunRecord:
    """A run's receipts, as the server signs them (one record per run key: resumed attempts add to it)."""

    run: str  # Flower run id of the newest attempt
    run_key: str  # the server's settings hash; stable across a resume
    receipts: tuple[Receipt, ...] = ()
    server_key: str = ""  # key id that signed it (set when read back)

    def with_receipt(self, receipt: Receipt) -> RunRecord:
        return RunRecord(self.run, self.run_key, (*self.receipts, receipt), self.server_key)

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "run": self.run, "run_key": self.run_key,
                "receipts": [r.fields() for r in self.receipts]}


def write_run_record(run_dir: Path, record: RunRecord, key: ed25519.Ed25519PrivateKey) -> Path:
    """Sign and write ``RUN_DIR/run-record.json`` atomically (call after every round; it replaces the last)."""
    signed = sign(record.to_json() | {"key": key_id(key.public_key())}, key)
    path = run_dir / RECORD_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, canonical(signed) + b"\n")
    return path


@dataclass
class RecordCheck:
    """A run record as read back: what could be parsed, what is wrong with it, what could not be checked."""

    path: Path
    record: RunRecord | None = None
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def _read_bytes(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise PrivacyError(f"run record {path} cannot be read: {err.strerror or err}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PrivacyError(f"run record {path} is not a regular file")
        if os.fstat(fd).st_size > MAX_RECORD_BYTES:
            raise PrivacyError(f"run record {path} is larger than {MAX_RECORD_BYTES} bytes; not read")
        return os.read(fd, MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)


def _receipts(raw: Any, check: RecordCheck) -> list[Receipt]:
    if not isinstance(raw, list):
        check.problems.append("field 'receipts' must be a list")
        return []
    out = []
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, dict) or set(item) != {"round", "node", "ledger_key", "seq", "head", "status"}:
            check.problems.append(f"receipt {i}: must be an object with round, node, ledger_key, seq, head, status")
            continue
        if problems := _problems(**item):
            check.problems += [f"receipt {i} (round {item.get('round')!r}, node {item.get('node')!r}): {p}"
                               for p in problems]
            continue
        out.append(Receipt(**item))
    return out


def read_run_record(run_dir: Path, server_key: ed25519.Ed25519PublicKey | None) -> RecordCheck:
    """Parse and verify ``RUN_DIR/run-record.json``; every problem is collected, none raised."""
    path = run_dir / RECORD_FILE if run_dir.is_dir() else run_dir
    check = RecordCheck(path)
    try:
        data = loads(_read_bytes(path))
    except PrivacyError as err:
        check.problems.append(str(err))
        return check
    except (ValueError, UnicodeDecodeError, DuplicateField, RecursionError) as err:
        check.problems.append(f"run record {path} is not valid JSON ({str(err)[:200]})")
        return check
    if not isinstance(data, dict) or (numbers := bad_numbers(data)):
        check.problems += numbers if isinstance(data, dict) else [f"run record {path} is not a JSON object"]
        return check
    check.problems += _record_shape(data)
    if check.problems:
        return check
    if entry_hash(data) != data["hash"]:
        check.problems.append("the run record's hash does not match its content (it was changed after signing)")
    elif server_key is None:
        check.notices.append(f"run record signed by {data['key']}: signature not checked (no --server-key given)")
    elif key_id(server_key) != data["key"]:
        check.problems.append(f"run record signed by {data['key']}, not by the server key given ({key_id(server_key)})")
    else:
        try:
            server_key.verify(base64.b64decode(data["sig"]), bytes.fromhex(data["hash"]))
        except InvalidSignature:
            check.problems.append("the run record's signature does not verify with the server key")
    check.record = RunRecord(data["run"], data["run_key"], tuple(_receipts(data["receipts"], check)), data["key"])
    return check


def _record_shape(data: Mapping[str, Any]) -> list[str]:
    want = {"format", "run", "run_key", "receipts", "key", "hash", "sig"}
    out = [f"run record: missing field '{k}'" for k in sorted(want - set(data))]
    out += [f"run record: unknown field '{str(k)[:64]}'" for k in sorted(set(data) - want)]
    if out:
        return out
    if data["format"] != RECORD_FORMAT:
        out.append(f"run record: field 'format' must be {RECORD_FORMAT!r}, got {str(data['format'])[:64]!r}")
    for name in ("run", "run_key"):
        if not isinstance(data[name], str) or len(data[name]) > MAX_ID:
            out.append(f"run record: field '{name}' must be a string of at most {MAX_ID} characters")
    if not isinstance(data["key"], str) or not KEY_ID.fullmatch(data["key"]):
        out.append("run record: field 'key' must be an ed25519 key id")
    if not isinstance(data["hash"], str) or not HEX64.fullmatch(data["hash"]):
        out.append("run record: field 'hash' must be 64 hex digits")
    if (sig := signature_problem(data["sig"])) is not None:
        out.append(f"run record: field 'sig' {sig}")
    return out


def cross_check(ledger_key: str, entries: Sequence[tuple[int, Mapping[str, Any]]],
                receipts: Sequence[Receipt]) -> list[Problem]:
    """Each receipt for ``ledger_key`` against the ledger's lines: missing, different, or contradicting entries."""
    by_line = dict(entries)
    last = max(by_line, default=0)
    out = []
    for r in receipts:
        if r.ledger_key != ledger_key:
            continue
        where = f"the server's receipt for round {r.round} from node {r.node}"
        entry = by_line.get(r.seq)
        if r.seq > last:
            out.append(Problem(r.seq, f"missing: the ledger ends at line {last}, but {where} names line {r.seq} "
                                      "(the ledger was truncated or rolled back to an older copy)"))
        elif entry is None or entry.get("hash") != r.head:
            out.append(Problem(r.seq, f"differs from {where} (head {r.head[:16]}...): the ledger was rewritten "
                                      "after the server saw it"))
        elif entry.get("kind") in ("round", "repair") and (
                entry.get("round") != r.round or
                (r.status in LEDGER_DECISION and entry.get("decision") != LEDGER_DECISION[r.status])):
            out.append(Problem(r.seq, f"says round {entry.get('round')} {entry.get('decision')}, but {where} "
                                      f"says {r.status}"))
    return out
