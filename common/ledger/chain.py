"""The epsilon ledger: append-only, hash-chained, Ed25519-signed JSON lines (spec: docs/ledger.md).

Every line is one entry in canonical JSON (sorted keys, no spaces, ASCII). Its
``hash`` is sha256 over the canonical JSON of the entry without ``hash`` and
``sig``; ``prev`` is the previous line's hash (64 zeros on line 1); ``seq`` is
the line number; ``sig`` is the node key's Ed25519 signature over the 32 hash
bytes. Line 1 is a signed header naming the node, its dataset and its policy
(budget, delta, accountant); a later ``policy`` entry records a change of policy.
Editing, deleting, inserting or reordering lines, or re-signing with another key,
breaks a check that names the line.

Appends happen under an exclusive ``flock``: read and verify the whole ledger (and
its witness, see ``ledger_witness.py``), decide, write one line with one ``write``
on an ``O_APPEND`` descriptor, fsync, advance the witness. A crash mid-append
leaves a torn last line (no newline), which every reader reports; it is repaired
only by ``ledger_repair.py``, which keeps the bytes and charges the round.

Reading is bounded: a ledger above :data:`MAX_LEDGER_BYTES` is refused unread, a
line above :data:`MAX_LINE_BYTES` is reported and skipped without being held in
memory, and every malformed value is a problem naming its line and field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.durable import fsync_dir
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.schema import (
    FORMAT,
    POLICY,
    DuplicateField,
    Entry,
    bad_numbers,
    entry_problems,
    event_from_json,
    event_to_json,
    loads,
)
from fedtune.common.ledger.witness import Witness, WitnessMark

__all__ = ["FORMAT", "GENESIS", "LEDGER_FILE", "Entry", "Ledger", "LedgerHeader", "LedgerSession", "ParsedLedger",
           "Problem", "canonical", "entry_hash", "event_from_json", "event_to_json", "read", "sign", "verify"]

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
MAX_LINE_BYTES = 64 * 1024  # an entry is ~1.3 KB; anything this long is not one
MAX_LEDGER_BYTES = 32 * 1024 * 1024  # ~25,000 rounds; larger files are refused unread
MAX_LINES = 100_000  # lines read at most (with the byte limit, this bounds the memory a ledger can take)
CHUNK = 1024 * 1024
ACCOUNTING_KINDS = ("round", "repair")  # entries that charge or refuse a round
NONCE_BYTES = 32  # every entry gets a fresh "nonce" (64 hex), so its hash cannot be recomputed from guesses


@dataclass(frozen=True)
class Problem:
    """One integrity problem, tied to a 1-based line of the ledger file (0: the file as a whole)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else f"file: {self.message}"


@dataclass
class ParsedLedger:
    path: Path
    entries: list[tuple[int, Entry]] = field(default_factory=list)  # (line number, entry) of lines that parsed
    problems: list[Problem] = field(default_factory=list)
    complete_bytes: int = 0  # bytes up to and including the last newline
    torn_bytes: int = 0  # bytes after the last newline (an interrupted append)


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that is hashed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def sign(entry: Mapping[str, Any], key: ed25519.Ed25519PrivateKey) -> Entry:
    """``entry`` with its ``hash`` and the key's ``sig`` over it (other fields unchanged)."""
    out = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    out["hash"] = entry_hash(out)
    out["sig"] = base64.b64encode(key.sign(bytes.fromhex(out["hash"]))).decode()
    return out


def _line_problem(raw: bytes) -> str | Entry:
    """The entry on one complete line, or what is wrong with the line."""
    if not raw:
        return "empty line"
    bad = next((i for i, b in enumerate(raw) if b < 0x20 or b > 0x7E), None)
    if bad is not None:
        return (f"byte 0x{raw[bad]:02x} at column {bad + 1}: a ledger line is printable ASCII "
                "(binary data, or an edit that is not UTF-8 canonical JSON)")
    try:
        entry = loads(raw)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    except DuplicateField as err:
        return f"field '{str(err)[:64]}' appears twice"
    except RecursionError:
        return "nested too deeply to be a ledger entry"
    if not isinstance(entry, dict):
        return f"not a JSON object (got {type(entry).__name__})"
    if not bad_numbers(entry) and raw != canonical(entry):
        return "not in canonical JSON form (the line was re-written or edited)"
    return entry


def parse_chunks(chunks: Iterable[bytes], path: Path) -> ParsedLedger:
    """Split a byte stream into entries without ever holding more than one line of at most MAX_LINE_BYTES."""
    parsed = ParsedLedger(path)
    buf, overlong, number, seen = bytearray(), 0, 1, 0

    def finish(raw: bytes) -> None:
        result = _line_problem(raw)
        if isinstance(result, str):
            parsed.problems.append(Problem(number, result))
        else:
            parsed.entries.append((number, result))

    for chunk in chunks:
        start = 0
        while number <= MAX_LINES:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            seen += len(piece) + (newline >= 0)
            if overlong or len(buf) + len(piece) > MAX_LINE_BYTES:
                overlong, buf = overlong + len(buf) + len(piece), bytearray()
            else:
                buf += piece
            if newline < 0:
                break
            if overlong:
                parsed.problems.append(Problem(number, f"longer than {MAX_LINE_BYTES} bytes ({overlong} bytes); "
                                                       "not a ledger entry, not read"))
            else:
                finish(bytes(buf))
            number, buf, overlong, start = number + 1, bytearray(), 0, newline + 1
            parsed.complete_bytes = seen
        if number > MAX_LINES:
            parsed.problems.append(Problem(0, f"more than {MAX_LINES} lines: lines after {MAX_LINES} are not read"))
            return parsed
    parsed.torn_bytes = overlong or len(buf)
    if parsed.torn_bytes:
        parsed.problems.append(Problem(number, f"torn last line: {parsed.torn_bytes} bytes without a newline "
                                               "(an append was interrupted, or the file was truncated)"))
    return parsed


def fd_chunks(fd: int, size: int) -> Iterator[bytes]:
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def file_problem(fd: int, path: Path) -> str | None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_LEDGER_BYTES:
        return f"{info.st_size} bytes; a ledger is at most {MAX_LEDGER_BYTES} bytes, so this is not read"
    return None


def read(path: Path) -> ParsedLedger:
    """Parse a ledger file for auditing; every problem (a symlink, a binary file, a bad line) is reported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        reason = "is a symbolic link; give the ledger file itself" if path.is_symlink() else \
            f"cannot be read: {err.strerror or err}"
        return ParsedLedger(path, problems=[Problem(0, reason)])
    try:
        if (problem := file_problem(fd, path)) is not None:
            return ParsedLedger(path, problems=[Problem(0, problem)])
        parsed = parse_chunks(fd_chunks(fd, os.fstat(fd).st_size), path)
    finally:
        os.close(fd)
    if not parsed.entries and not parsed.problems:
        parsed.problems.append(Problem(0, "the ledger is empty"))
    return parsed


def _signature_problem(entry: Entry, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> str | None:
    public = keys.get(entry["key"])
    if public is None:
        return f"signed by key {entry['key']}, for which no public key was given"
    try:
        public.verify(base64.b64decode(entry["sig"], validate=True), bytes.fromhex(entry["hash"]))
    except (InvalidSignature, binascii.Error, ValueError):
        return f"signature does not verify with key {entry['key']} (replaced signature, or signed by another key)"
    return None


def _place_problem(number: int, entry: Entry, first: Entry | None) -> str | None:
    """Headers only on line 1; policy changes only after a header, for the same node."""
    if entry["kind"] == "header" and number != 1:
        return "a header entry on a line other than 1 (a second ledger spliced in?)"
    if entry["kind"] == "policy":
        if first is None or first.get("kind") != "header":
            return "a policy entry in a ledger without a header on line 1"
        if entry["node"] != first["node"]:
            return f"policy entry for node {entry['node']}, but the header (line 1) names {first['node']}"
    return None


def verify(parsed: ParsedLedger, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> list[Problem]:
    """Chain, hashes, signatures and shape of every entry; parse problems included. Empty = intact."""
    problems = list(parsed.problems)
    prev_hash, first_key, first = GENESIS, None, None
    for number, entry in parsed.entries:
        first = first if first is not None or number != 1 else entry
        if shape := entry_problems(entry):
            problems += [Problem(number, p) for p in shape]
            prev_hash = entry["hash"] if isinstance(entry.get("hash"), str) else ""
            continue
        if entry["seq"] != number:
            problems.append(Problem(number, f"sequence number {entry['seq']}, expected {number} "
                                            "(a line was deleted, inserted or moved)"))
        if entry["prev"] != prev_hash:
            problems.append(Problem(number, "previous-entry hash does not match the line before "
                                            "(a line was deleted, inserted, moved or changed)"))
        if entry_hash(entry) != entry["hash"]:
            problems.append(Problem(number, "entry hash does not match its content (the entry was changed)"))
        elif (sig_problem := _signature_problem(entry, keys)) is not None:
            problems.append(Problem(number, sig_problem))
        if (place := _place_problem(number, entry, first)) is not None:
            problems.append(Problem(number, place))
        first_key = first_key or entry["key"]
        if entry["key"] != first_key:
            problems.append(Problem(number, f"signed by key {entry['key']}, but the first entry by {first_key}"))
        prev_hash = entry["hash"]
    return sorted(problems, key=lambda p: p.line)


@dataclass(frozen=True)
class LedgerHeader:
    """Who keeps this ledger and under which policy: the signed first entry (and later policy changes)."""

    node: str  # "sha256:<hex>" of the node's auth public key (deployment), or "simulation:client-<id>"
    dataset: str  # the policy's dataset-id: the budget key
    budget: float  # the policy's max-epsilon
    delta: float  # the policy's delta
    accountant: str  # "prv" | "rdp"

    def __post_init__(self) -> None:
        problems = [f"ledger header field '{name}' {problem}" for name, check in POLICY.items()
                    if (problem := check(getattr(self, name))) is not None]
        if problems:
            raise PrivacyError(problems)

    def fields(self) -> dict[str, Any]:
        return {"node": self.node, "dataset": self.dataset, "budget": self.budget, "delta": self.delta,
                "accountant": self.accountant}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> LedgerHeader:
        return cls(entry["node"], entry["dataset"], entry["budget"], entry["delta"], entry["accountant"])


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LedgerSession:
    """The verified ledger under an exclusive lock; :meth:`append` signs, writes and fsyncs one entry."""

    def __init__(self, fd: int, path: Path, entries: list[Entry], key: ed25519.Ed25519PrivateKey,
                 witness: Witness | None) -> None:
        self._fd, self.path, self.all_entries, self._key, self._witness = fd, path, entries, key, witness
        self.key_id = key_id(key.public_key())

    @property
    def entries(self) -> list[Entry]:
        """The entries that charge or refuse a round (rounds and repairs), oldest first."""
        return [e for e in self.all_entries if e["kind"] in ACCOUNTING_KINDS]

    @property
    def header(self) -> LedgerHeader | None:
        first = self.all_entries[0] if self.all_entries else None
        return LedgerHeader.from_entry(first) if first is not None and first["kind"] == "header" else None

    @property
    def policy(self) -> LedgerHeader | None:
        """The policy in force: the newest header or policy entry."""
        last = next((e for e in reversed(self.all_entries) if e["kind"] in ("header", "policy")), None)
        return LedgerHeader.from_entry(last) if last is not None else None

    @property
    def head(self) -> WitnessMark | None:
        """Key id, seq and hash of the newest entry (what a training reply reports as its receipt)."""
        last = self.all_entries[-1] if self.all_entries else None
        return WitnessMark(self.key_id, last["seq"], last["hash"]) if last is not None else None

    def append(self, fields: Mapping[str, Any]) -> Entry:
        """Add one round entry (charged or refused); returns it once it is durably on disk."""
        policy = self.policy
        if policy is not None:
            problems = [f"missing field '{name}' (required once the ledger has a header)"
                        for name in ("rng", "released") if name not in fields]
            problems += [f"field '{name}' is {fields.get(name)!r}, but the policy in force says {want!r}"
                         for name, want in (("dataset", policy.dataset), ("budget", policy.budget),
                                            ("delta", policy.delta)) if fields.get(name) != want]
            accountant = fields.get("accountant")
            if isinstance(accountant, Mapping) and accountant.get("name") != policy.accountant:
                problems.append(f"accountant {accountant.get('name')!r}, but the policy in force says "
                                f"{policy.accountant!r}")
            if problems:
                raise PrivacyError([f"ledger {self.path}: refusing to append: {p}" for p in problems])
        return self.write("round", fields)

    def write(self, kind: str, fields: Mapping[str, Any]) -> Entry:
        """Sign and durably append one entry of ``kind`` (header, policy, round, repair).

        Every entry gets a fresh 256-bit ``nonce`` from ``secrets``: the entry's hash leaves the node (the
        ledger head in each reply), and without a secret in it the server could recompute that hash for
        candidate datasets (the fingerprint) from values it knows or guesses.
        """
        prev = self.all_entries[-1]["hash"] if self.all_entries else GENESIS
        entry = sign({**fields, "format": FORMAT, "kind": kind, "seq": len(self.all_entries) + 1, "prev": prev,
                      "time": _utc_now(), "key": self.key_id, "nonce": secrets.token_hex(NONCE_BYTES)}, self._key)
        if shape := entry_problems(entry):
            raise PrivacyError([f"ledger {self.path}: refusing to append a malformed entry: {p}" for p in shape])
        line = canonical(entry) + b"\n"
        if len(line) > MAX_LINE_BYTES:
            raise PrivacyError(f"ledger {self.path}: refusing to append an entry of {len(line)} bytes "
                               f"(at most {MAX_LINE_BYTES})")
        written = 0
        while written < len(line):  # one write in practice; loop in case the kernel splits it
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        if not self.all_entries:
            fsync_dir(self.path.parent)  # the file itself is new: make its directory entry durable
        self.all_entries.append(entry)
        if self._witness is not None:
            self._witness.advance(WitnessMark(self.key_id, entry["seq"], entry["hash"]))
        return entry

    def bind(self, header: LedgerHeader) -> None:
        """Start the ledger with ``header``, or record a policy change; refuse another node's ledger."""
        if not self.all_entries:
            self.write("header", header.fields())
            return
        current, first = self.policy, self.header
        if first is None:
            raise PrivacyError(f"ledger {self.path} has no header (written before ledgers named their node): see "
                               "docs/ledger.md, 'Format 1 ledgers'")
        if first.node != header.node:
            raise PrivacyError(f"ledger {self.path} belongs to node {first.node}; this node is {header.node}")
        if current != header:
            self.write("policy", header.fields())


class Ledger:
    """A node's ledger file, signed with the node's key; optionally bound to a header and guarded by a witness."""

    def __init__(self, path: Path, key: ed25519.Ed25519PrivateKey, *, header: LedgerHeader | None = None,
                 witness: Path | None = None) -> None:
        self.path = path
        self.key = key
        self.header = header
        self.witness = Witness(witness) if witness is not None else None

    @contextmanager
    def _locked(self) -> Iterator[tuple[int, list[Entry]]]:
        """Lock, read and verify the whole ledger; refuse to go on if anything is wrong with it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise PrivacyError(f"ledger {self.path} cannot be opened: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (problem := file_problem(fd, self.path)) is not None:
                raise PrivacyError(f"ledger {self.path}: {problem}")
            parsed = parse_chunks(fd_chunks(fd, os.fstat(fd).st_size), self.path)
            public = self.key.public_key()
            if problems := verify(parsed, {key_id(public): public}):
                raise PrivacyError(
                    [f"ledger {self.path} {p}" for p in problems[:20]]
                    + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
                    + ["the node will not train on a damaged ledger: see docs/ledger.md, 'Recovery'"])
            yield fd, [e for _, e in parsed.entries]
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def session(self) -> Iterator[LedgerSession]:
        """The verified ledger, checked against its witness and bound to the header (when given)."""
        with self._locked() as (fd, entries):
            session = LedgerSession(fd, self.path, entries, self.key, self.witness)
            if self.witness is not None:
                self.witness.check(session.key_id, entries, self.path)
                if (head := session.head) is not None:
                    self.witness.advance(head)  # an append that crashed before its witness update
            if self.header is not None:
                session.bind(self.header)
            yield session

    def adopt_witness(self) -> WitnessMark | None:
        """Start a witness at the ledger's current head (first start with a witness; an operator's decision)."""
        if self.witness is None:
            raise PrivacyError("this ledger has no witness path to adopt")
        with self._locked() as (fd, entries):
            head = LedgerSession(fd, self.path, entries, self.key, None).head
            current = self.witness.read()
            if current is not None:
                self.witness.check(key_id(self.key.public_key()), entries, self.path)
            if head is not None:
                self.witness.advance(head)
            return head

    def entries(self) -> list[Entry]:
        with self.session() as s:
            return list(s.entries)
