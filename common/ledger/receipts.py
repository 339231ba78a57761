"""Receipts: what the server saw of each node's ledger, signed, to catch rollback and truncation.

Every training reply carries the node's ledger head after that round: the ledger
key id (``ledger-key``), the entry's sequence number (``ledger-seq``) and its hash
(``ledger-head``). The server keeps one :class:`Receipt` per node and round in its
run record, ``RUN_DIR/run-record.json``: canonical JSON signed with the server's
Ed25519 record key (the same key format as the nodes' ledger keys; by default
``WORK_DIR/server-record.key`` next to the server's checkpoints, its public half
``server-record.pub`` is what auditors get).

Every reply also carries the node's own signature over what it reported
(``node-sig``: :func:`sign_receipt`, Ed25519 with the node's ledger key, over the run
id, the round, ``seq``, ``head`` and the node's status), which the receipt keeps. The
server is not trusted: a receipt only counts against a node when the node signed it
(:func:`receipt_signature_problem`), so a server cannot fabricate receipts that make
an honest node fail its audit.

A node's ledger must contain, at each receipt's line, exactly the entry whose hash
the node reported. A ledger that is shorter than a receipt was truncated or rolled
back to an older copy; one with other content at that line was rewritten after
the fact. :func:`cross_check` names the round, the node and the line.

Records of format ``fedtune-run-record/1`` (written before nodes signed their replies)
still read; their receipts have no ``run`` and no ``node_sig``.
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
from fedtune.common.ledger.chain import Problem, canonical, entry_hash, sign
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.schema import (
    HEX64,
    KEY_ID,
    MAX_ID,
    MAX_SEQ,
    DuplicateField,
    bad_numbers,
    loads,
    signature_problem,
)

RECORD_FILE = "run-record.json"
RECORD_FORMAT = "fedtune-run-record/2"
RECORD_FORMAT_V1 = "fedtune-run-record/1"  # receipts without run and node signature; still read
RECEIPT_FORMAT = "fedtune-receipt/1"  # what a node's reply signature covers
RECORD_KEY_FILE = "server-record.key"
MAX_RECORD_BYTES = 32 * 1024 * 1024
Status = Literal["trained", "refused", "rejected", "error"]
STATUSES: tuple[str, ...] = ("trained", "refused", "rejected", "error")
NODE_STATUSES: tuple[str, ...] = ("trained", "refused")  # what a node itself can say (and sign)
# What the node said, by the server's view of the reply: a reply rejected for its update was a trained one.
NODE_STATUS = {"trained": "trained", "rejected": "trained", "refused": "refused"}
# What a node's ledger entry at the receipt's line must say, by the server's view of the reply.
LEDGER_DECISION = {"trained": "charged", "rejected": "charged", "refused": "refused"}
V1_FIELDS = ("round", "node", "ledger_key", "seq", "head", "status")
V2_FIELDS = (*V1_FIELDS, "run", "node_sig")


def _receipt_message(*, run: str, round: int, seq: int, head: str, status: str) -> bytes:
    return canonical({"format": RECEIPT_FORMAT, "run": run, "round": round, "seq": seq, "head": head,
                      "status": status})


def sign_receipt(key: ed25519.Ed25519PrivateKey, *, run: str, round: int, seq: int, head: str, status: str) -> str:
    """The node's signature over what it reports for one round (base64, 88 characters).

    Signed: the canonical JSON of ``{"format": "fedtune-receipt/1", "run", "round", "seq", "head", "status"}``
    with ``run`` the Flower run id, ``round`` the server round, ``seq``/``head`` the ledger entry the node
    cites and ``status`` the node's own answer (trained or refused).
    """
    if status not in NODE_STATUSES:
        raise PrivacyError(f"a node signs only {' or '.join(NODE_STATUSES)} replies, got status {status!r}")
    message = _receipt_message(run=run, round=round, seq=seq, head=head, status=status)
    return base64.b64encode(key.sign(message)).decode()


def receipt_signature_problem(public: ed25519.Ed25519PublicKey, sig: str, *, run: str, round: int, seq: int,
                              head: str, status: str) -> str | None:
    """None when ``sig`` is the node's signature over exactly these values; else what is wrong."""
    if not sig:
        return "it carries no node signature"
    if (shape := signature_problem(sig)) is not None:
        return f"its node signature {shape}"
    if status not in NODE_STATUSES:
        return f"status {status!r} is not one a node signs ({', '.join(NODE_STATUSES)})"
    try:
        public.verify(base64.b64decode(sig), _receipt_message(run=run, round=round, seq=seq, head=head,
                                                               status=status))
    except InvalidSignature:
        return (f"the node's signature does not verify over run {run!r}, round {round}, line {seq}, head "
                f"{head[:16]}..., status {status} (signed by another key, or over other values)")
    return None


def _problems(**values: Any) -> list[str]:
    out = []
    for name, value in values.items():
        if name in ("round", "seq"):
            lo = 0 if name == "round" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_SEQ:
                out.append(f"field '{name}' must be an integer >= {lo}, got {value!r}")
        elif name == "node_sig":
            if value != "" and (problem := signature_problem(value)) is not None:
                out.append(f"field 'node_sig' {problem}")
        elif name == "run" and value == "":
            continue  # a format-1 receipt: the run was not recorded
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
    seq: int  # line of the ledger entry the node cited for this round
    head: str  # that entry's hash
    status: str  # trained | refused | rejected | error (the server's reading of the reply)
    run: str = ""  # Flower run id of the attempt that got the reply ("": a format-1 receipt)
    node_sig: str = ""  # the node's signature over (run, round, seq, head, its status) ("": format 1)

    def __post_init__(self) -> None:
        if problems := _problems(**self.fields()):
            raise PrivacyError([f"receipt for round {self.round!r}, node {self.node!r}: {p}" for p in problems])

    @property
    def signed(self) -> bool:
        return bool(self.node_sig)

    def fields(self) -> dict[str, Any]:
        return {"round": self.round, "node": self.node, "ledger_key": self.ledger_key, "seq": self.seq,
                "head": self.head, "status": self.status, "run": self.run, "node_sig": self.node_sig}

    def node_signature_problem(self, public: ed25519.Ed25519PublicKey) -> str | None:
        """None when the node signed this receipt's values with ``public``'s key (see :func:`sign_receipt`)."""
        status = NODE_STATUS.get(self.status, self.status)
        return receipt_signature_problem(public, self.node_sig, run=self.run, round=self.round, seq=self.seq,
                                         head=self.head, status=status)


@dataclass(frozen=True)
class RunRecord:
    """A run's receipts, as the server signs them (one record per run key: resumed attempts add to it)."""

    run: str  # Flower run id of the newest attempt
    run_key: str  # the server's settings hash; stable across a resume
    receipts: tuple[Receipt, ...] = ()
    server_key: str = ""  # key id that signed it (set when read back)
    format: str = RECORD_FORMAT  # RECORD_FORMAT_V1 when read back from a record of the previous version
    # Client-level (institution-level) DP of the aggregate under secure aggregation with client-dp: epsilon,
    # delta, mechanism, rounds and the trust assumption it rests on (server/secure_aggregation.py); None without.
    client_level: Mapping[str, Any] | None = None

    def with_receipt(self, receipt: Receipt) -> RunRecord:
        return RunRecord(self.run, self.run_key, (*self.receipts, receipt), self.server_key, self.format,
                         self.client_level)

    def to_json(self) -> dict[str, Any]:
        """Format 2; refuses receipts that do not carry the run and the node's signature."""
        unsigned = [r for r in self.receipts if not (r.run and r.signed)]
        if self.format != RECORD_FORMAT or unsigned:
            raise PrivacyError(f"a {RECORD_FORMAT} record needs the run and the node's signature on every receipt"
                               + (f"; round {unsigned[0].round}, node {unsigned[0].node} has none" if unsigned
                                  else f", not a {self.format} record"))
        out = {"format": RECORD_FORMAT, "run": self.run, "run_key": self.run_key,
               "receipts": [r.fields() for r in self.receipts]}
        return out | ({"client_level": dict(self.client_level)} if self.client_level is not None else {})


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


def _receipts(raw: Any, fmt: str, check: RecordCheck) -> list[Receipt]:
    if not isinstance(raw, list):
        check.problems.append("field 'receipts' must be a list")
        return []
    want = V2_FIELDS if fmt == RECORD_FORMAT else V1_FIELDS
    out = []
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            check.problems.append(f"receipt {i}: must be an object with {', '.join(want)}")
            continue
        where = f"receipt {i} (round {item.get('round')!r}, node {item.get('node')!r})"
        if set(item) != set(want):
            check.problems.append(f"{where}: must have exactly the fields {', '.join(want)} ({fmt})")
            continue
        problems = _problems(**item)
        if fmt == RECORD_FORMAT and item["run"] == "":
            problems.append("field 'run' must be the Flower run id, got ''")
        if problems:
            check.problems += [f"{where}: {p}" for p in problems]
            continue
        out.append(Receipt(**item))
    return out


def _server_signature(data: Mapping[str, Any], server_keys: Sequence[ed25519.Ed25519PublicKey],
                      check: RecordCheck) -> None:
    """The record's hash, and its signature by one of ``server_keys`` (a notice when none was given)."""
    if entry_hash(data) != data["hash"]:
        check.problems.append("the run record's hash does not match its content (it was changed after signing)")
        return
    if not server_keys:
        check.notices.append(f"run record signed by {data['key']}: signature not checked (no --server-key given)")
        return
    by_id = {key_id(k): k for k in server_keys}
    public = by_id.get(data["key"])
    if public is None:
        check.problems.append(f"run record signed by {data['key']}, not by the server key given "
                              f"({', '.join(sorted(by_id))})")
        return
    try:
        public.verify(base64.b64decode(data["sig"]), bytes.fromhex(data["hash"]))
    except InvalidSignature:
        check.problems.append("the run record's signature does not verify with the server key")


def read_run_record(run_dir: Path, server_key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey] | None
                    ) -> RecordCheck:
    """Parse and verify ``RUN_DIR/run-record.json`` (signed by ``server_key``, or by one of several given);
    every problem is collected, none raised."""
    path = run_dir / RECORD_FILE if run_dir.is_dir() else run_dir
    server_keys = [server_key] if isinstance(server_key, ed25519.Ed25519PublicKey) else list(server_key or ())
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
    _server_signature(data, server_keys, check)
    receipts = tuple(_receipts(data["receipts"], data["format"], check))
    check.record = RunRecord(data["run"], data["run_key"], receipts, data["key"], data["format"],
                             data.get("client_level"))
    return check


def _client_level_ok(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    eps, delta, rounds = value.get("epsilon"), value.get("delta"), value.get("rounds")
    return (isinstance(eps, int | float) and not isinstance(eps, bool) and 0 <= eps < float("inf")
            and isinstance(delta, float) and 0 < delta < 1 and isinstance(rounds, int) and rounds >= 0
            and isinstance(value.get("trust"), str) and len(str(value.get("mechanism", ""))) <= 1024)


def _record_shape(data: Mapping[str, Any]) -> list[str]:
    want = {"format", "run", "run_key", "receipts", "key", "hash", "sig"}
    out = [f"run record: missing field '{k}'" for k in sorted(want - set(data))]
    out += [f"run record: unknown field '{str(k)[:64]}'" for k in sorted(set(data) - want - {"client_level"})]
    if "client_level" in data and not _client_level_ok(data["client_level"]):
        out.append("run record: field 'client_level' must be an object with a finite epsilon >= 0, delta in "
                   "(0, 1), rounds >= 0 and a trust assumption")
    if out:
        return out
    if data["format"] not in (RECORD_FORMAT, RECORD_FORMAT_V1):
        out.append(f"run record: field 'format' must be {RECORD_FORMAT!r} (or {RECORD_FORMAT_V1!r}), got "
                   f"{str(data['format'])[:64]!r}")
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


def _contradiction(entry: Mapping[str, Any], r: Receipt) -> str | None:
    """What the entry at the receipt's line says that the receipt does not (None: they agree).

    A refusal may cite an earlier refusal entry (a node coalesces identical refusals), so only its kind and
    decision are checked; a trained (or rejected, i.e. trained) reply's entry must be that round's charge.
    """
    want = LEDGER_DECISION.get(r.status)
    if want is None:  # an error reply names no ledger entry
        return None
    if entry.get("kind") != "round":
        return f"is a {entry.get('kind')} entry"
    if entry.get("decision") != want or (want == "charged" and entry.get("round") != r.round):
        return f"says round {entry.get('round')} {entry.get('decision')}"
    return None


def cross_check(ledger_key: str, entries: Sequence[tuple[int, Mapping[str, Any]]],
                receipts: Sequence[Receipt], source: str = "") -> list[Problem]:
    """Each receipt for ``ledger_key`` against the ledger's lines: missing, different, or contradicting entries.

    ``source`` (the run record the receipts come from) is named at the end of every problem when given.
    """
    by_line = dict(entries)
    last = max(by_line, default=0)
    out = []
    suffix = f" (receipt in {source})" if source else ""
    for r in receipts:
        if r.ledger_key != ledger_key:
            continue
        where = f"the server's receipt for round {r.round} from node {r.node}"
        entry = by_line.get(r.seq)
        if r.seq > last:
            out.append(Problem(r.seq, f"missing: the ledger ends at line {last}, but {where} names line {r.seq} "
                                      f"(the ledger was truncated or rolled back to an older copy){suffix}"))
        elif entry is None or entry.get("hash") != r.head:
            out.append(Problem(r.seq, f"differs from {where} (head {r.head[:16]}...): the ledger was rewritten "
                                      f"after the server saw it{suffix}"))
        elif (says := _contradiction(entry, r)) is not None:
            out.append(Problem(r.seq, f"{says}, but {where} says {r.status}{suffix}"))
    return out
