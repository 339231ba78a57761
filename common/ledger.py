"""The epsilon ledger: append-only, hash-chained, Ed25519-signed JSON lines (spec: docs/ledger.md).

Every line is one entry in canonical JSON (sorted keys, no spaces, ASCII). Its
``hash`` is sha256 over the canonical JSON of the entry without ``hash`` and
``sig``; ``prev`` is the previous line's hash (64 zeros on line 1); ``seq`` is
the line number; ``sig`` is the node key's Ed25519 signature over the 32 hash
bytes. Editing, deleting, inserting or reordering lines, or re-signing with
another key, breaks a check that names the line.

Appends happen under an exclusive ``flock``: read and verify the whole ledger,
decide, write one line with one ``write`` on an ``O_APPEND`` descriptor, fsync.
A crash mid-append leaves a torn last line (no newline), which every reader
reports; nothing is ever silently dropped or rewritten.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.accounting import RELATION, SAMPLING, DpEvent
from fedtune.common.durable import fsync_dir
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger_key import key_id

FORMAT = "fedtune-ledger/1"
GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
Entry = dict[str, Any]

# Fields every entry must carry, with their JSON types (see docs/ledger.md).
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "seq": int, "prev": str, "time": str, "key": str, "run": str, "round": int,
    "dataset": str, "fingerprint": str, "decision": str, "reason": str, "event": (dict, type(None)),
    "delta": float, "accountant": dict, "epsilon": (int, float, type(None)), "epsilon_round": (int, float, type(None)),
    "budget": (int, float), "request": dict, "hash": str, "sig": str,
}
DECISIONS = ("charged", "refused")


@dataclass(frozen=True)
class Problem:
    """One integrity problem, tied to a 1-based line of the ledger file."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ParsedLedger:
    path: Path
    entries: list[tuple[int, Entry]]  # (line number, entry) for every line that parsed
    problems: list[Problem]


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that is hashed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def parse(data: bytes, path: Path) -> ParsedLedger:
    """Split into entries; report unparsable lines and a torn (newline-less) last line by number."""
    entries, problems = [], []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as every complete append does
    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(Problem(number, f"not valid JSON ({err.msg if hasattr(err, 'msg') else err})"))
            continue
        if not isinstance(entry, dict):
            problems.append(Problem(number, f"not a JSON object (got {type(entry).__name__})"))
            continue
        if raw != canonical(entry):
            problems.append(Problem(number, "not in canonical JSON form (the line was re-written or edited)"))
        entries.append((number, entry))
    if torn:
        problems.append(Problem(len(lines) + 1, f"torn last line: {len(torn)} bytes without a newline "
                                                "(an append was interrupted, or the file was truncated)"))
    return ParsedLedger(path, entries, problems)


def read(path: Path) -> ParsedLedger:
    try:
        return parse(path.read_bytes(), path)
    except OSError as err:
        raise PrivacyError(f"ledger {path} cannot be read: {err.strerror or err}") from err


def shape_problems(entry: Entry) -> list[str]:
    out = []
    for name, kind in REQUIRED.items():
        if name not in entry:
            out.append(f"missing field '{name}'")
        elif isinstance(entry[name], bool) or not isinstance(entry[name], kind):
            out.append(f"field '{name}' has the wrong type ({type(entry[name]).__name__})")
    if entry.get("format") not in (None, FORMAT):
        out.append(f"unknown format {entry.get('format')!r} (expected {FORMAT})")
    if entry.get("decision") not in (None, *DECISIONS):
        out.append(f"decision must be charged or refused, got {entry.get('decision')!r}")
    return out


def _signature_problem(entry: Entry, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> str | None:
    public = keys.get(entry["key"])
    if public is None:
        return f"signed by key {entry['key']}, for which no public key was given"
    try:
        public.verify(base64.b64decode(entry["sig"], validate=True), bytes.fromhex(entry["hash"]))
    except (InvalidSignature, binascii.Error, ValueError):
        return f"signature does not verify with key {entry['key']} (replaced signature, or signed by another key)"
    return None


def verify(parsed: ParsedLedger, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> list[Problem]:
    """Chain, hashes and signatures of every entry; parse problems included. Empty = intact."""
    problems = list(parsed.problems)
    prev_hash, first_key = GENESIS, None
    for number, entry in parsed.entries:
        if shape := shape_problems(entry):
            problems += [Problem(number, p) for p in shape]
            prev_hash = entry.get("hash", "") if isinstance(entry.get("hash"), str) else ""
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
        first_key = first_key or entry["key"]
        if entry["key"] != first_key:
            problems.append(Problem(number, f"signed by key {entry['key']}, but line 1 by {first_key}"))
        prev_hash = entry["hash"]
    return sorted(problems, key=lambda p: p.line)


def event_to_json(event: DpEvent | None) -> dict[str, Any] | None:
    """The ledger's form of a DP event (None: a round trained without DP)."""
    if event is None:
        return None
    return {"mechanism": "subsampled-gaussian", "sampling": SAMPLING, "relation": RELATION,
            "sample_rate": event.sample_rate, "noise_multiplier": event.noise_multiplier,
            "steps": event.steps, "clip_norm": event.clip_norm}


def event_from_json(raw: Mapping[str, Any] | None) -> DpEvent | None:
    """Inverse of :func:`event_to_json`; raises PrivacyError for an event no accountant here can replay."""
    if raw is None:
        return None
    if (raw.get("sampling"), raw.get("relation")) != (SAMPLING, RELATION):
        raise PrivacyError(f"event with sampling {raw.get('sampling')!r} / relation {raw.get('relation')!r}; "
                           f"only {SAMPLING} / {RELATION} can be replayed")
    try:
        return DpEvent(float(raw["sample_rate"]), float(raw["noise_multiplier"]), raw["steps"],
                       float(raw["clip_norm"]))
    except (KeyError, TypeError, ValueError) as err:
        raise PrivacyError(f"malformed event {raw!r}: {err}") from err


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LedgerSession:
    """The verified ledger under an exclusive lock; :meth:`append` signs, writes and fsyncs one entry."""

    def __init__(self, fd: int, path: Path, entries: list[Entry], key: ed25519.Ed25519PrivateKey) -> None:
        self._fd, self.path, self.entries, self._key = fd, path, entries, key
        self._key_id = key_id(key.public_key())

    def append(self, fields: Mapping[str, Any]) -> Entry:
        """Add one entry; returns it once it is durably on disk."""
        prev = self.entries[-1]["hash"] if self.entries else GENESIS
        entry: Entry = {**fields, "format": FORMAT, "seq": len(self.entries) + 1, "prev": prev,
                        "time": _utc_now(), "key": self._key_id}
        entry["hash"] = entry_hash(entry)
        entry["sig"] = base64.b64encode(self._key.sign(bytes.fromhex(entry["hash"]))).decode()
        if shape := shape_problems(entry):
            raise PrivacyError([f"ledger {self.path}: refusing to append a malformed entry: {p}" for p in shape])
        line = canonical(entry) + b"\n"
        written = 0
        while written < len(line):  # one write in practice; loop in case the kernel splits it
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        if not self.entries:
            fsync_dir(self.path.parent)  # the file itself is new: make its directory entry durable
        self.entries.append(entry)
        return entry


class Ledger:
    """A node's ledger file, signed with the node's key."""

    def __init__(self, path: Path, key: ed25519.Ed25519PrivateKey) -> None:
        self.path = path
        self.key = key

    @contextmanager
    def session(self) -> Iterator[LedgerSession]:
        """Lock, read and verify the whole ledger; refuse to go on if anything is wrong with it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            parsed = parse(data, self.path)
            problems = verify(parsed, {key_id(self.key.public_key()): self.key.public_key()})
            if problems:
                raise PrivacyError(
                    [f"ledger {self.path} {p}" for p in problems]
                    + ["the node will not train on a damaged ledger: see docs/ledger.md, 'Recovery'"])
            yield LedgerSession(fd, self.path, [e for _, e in parsed.entries], self.key)
        finally:
            os.close(fd)  # releases the lock

    def entries(self) -> list[Entry]:
        with self.session() as s:
            return list(s.entries)
