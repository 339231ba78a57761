"""The node's ledger file: locked, verified, appended to one signed entry at a time (docs/ledger.md, 'Writing').

Appends happen under an exclusive ``flock``: read (``reader.py``) and verify
(``chain.py``) the whole ledger, check it against its witness (``witness.py``),
decide, write one line with one ``write`` on an ``O_APPEND`` descriptor, fsync,
advance the witness. A crash mid-append leaves a torn last line (no newline),
which every reader reports; it is repaired only by ``client/ledger_repair.py``,
which keeps the bytes and charges the round.

Verification is incremental within a process: the ledger's bytes are read and hashed at every session, and
when they are exactly the bytes this process last verified or wrote (same length, same sha256), the entries
verified then are used again; any other content (an edit, a truncation, a line appended by another process)
is parsed and verified in full. A simulation's process runs thousands of nodes' rounds; each then pays one
read and one sha256 of its ledger per round instead of a signature check per line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.durable import fsync_dir
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.chain import GENESIS, canonical, sign, verify
from fedtune.common.ledger.entry import (
    MISSING,
    LedgerEntry,
    LedgerHeader,
    PolicyEntry,
    RoundEntry,
    Seal,
    entry_from_json,
)
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.reader import MAX_LINE_BYTES, fd_chunks, file_problem, parse_chunks
from fedtune.common.ledger.schema import ENVELOPE, FORMAT, Entry, content_problems, entry_problems
from fedtune.common.ledger.witness import Witness, WitnessMark

LEDGER_FILE = "ledger.jsonl"  # the node's ledger, in its state directory
NONCE_BYTES = 32  # every entry gets a fresh "nonce" (64 hex), so its hash cannot be recomputed from guesses
E = TypeVar("E", PolicyEntry, RoundEntry)
MAX_KNOWN_LEDGERS = 65_536  # ledgers whose verified state a process keeps (a simulation's nodes)


@dataclass
class _Known:
    """A ledger's bytes as this process last verified or wrote them, with what they hold."""

    size: int  # bytes
    digest: Any  # hashlib sha256 over those bytes (copied before it is extended)
    entries: list[Entry]  # the verified JSON objects, oldest first
    typed: list[LedgerEntry] | None  # the same as typed entries, when they were built


# (ledger path, key id) -> its known state; only ever read under the ledger's lock
_KNOWN: OrderedDict[tuple[str, str], _Known] = OrderedDict()


def _remember(path: Path, key: str, known: _Known) -> None:
    _KNOWN[(str(path), key)] = known
    _KNOWN.move_to_end((str(path), key))
    while len(_KNOWN) > MAX_KNOWN_LEDGERS:
        _KNOWN.popitem(last=False)


def forget_verified() -> None:
    """Drop what this process knows of every ledger: the next session of each verifies it in full."""
    _KNOWN.clear()


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LedgerSession:
    """The verified ledger under an exclusive lock; :meth:`append` signs, writes and fsyncs one round entry."""

    def __init__(self, fd: int, path: Path, entries: list[Entry], key: ed25519.Ed25519PrivateKey,
                 witness: Witness | None, *, known: _Known | None = None) -> None:
        self._fd, self.path, self._key, self._witness = fd, path, key, witness
        self.all_entries = entries  # every line as verified JSON objects (what was hashed and signed), oldest first
        self._typed: list[LedgerEntry] | None = list(known.typed) if known and known.typed is not None else None
        self.key_id = key_id(key.public_key())
        self._known = known  # the file's bytes as verified (size, sha256), extended by every write

    @property
    def typed(self) -> list[LedgerEntry]:
        """Every entry as its typed value, oldest first (the lines verified before the session opened)."""
        if self._typed is None:
            self._typed = [entry_from_json(e) for e in self.all_entries]
        return self._typed

    @property
    def entries(self) -> list[RoundEntry]:
        """The entries that charge or refuse a round (rounds and repairs), oldest first."""
        return [e for e in self.typed if isinstance(e, RoundEntry)]

    @property
    def header(self) -> LedgerHeader | None:
        first = self.typed[0] if self.all_entries else None
        return first.policy if isinstance(first, PolicyEntry) and first.kind == "header" else None

    @property
    def policy(self) -> LedgerHeader | None:
        """The policy in force: the newest header or policy entry."""
        last = next((e for e in reversed(self.typed) if isinstance(e, PolicyEntry)), None)
        return last.policy if last is not None else None

    @property
    def head(self) -> WitnessMark | None:
        """Key id, seq and hash of the newest entry (what a training reply reports as its receipt)."""
        last = self.all_entries[-1] if self.all_entries else None
        return WitnessMark(self.key_id, last["seq"], last["hash"]) if last is not None else None

    def append(self, entry: RoundEntry | Mapping[str, Any]) -> RoundEntry:
        """Add one round entry (charged or refused); returns it, sealed, once it is durably on disk.

        A mapping of the round's fields (the untyped call, kept for callers that still build dicts) is checked
        like the typed entry and read into one; as before, its format, kind and seal fields are the ledger's.
        """
        if not isinstance(entry, RoundEntry):
            content = {k: v for k, v in entry.items() if k not in ENVELOPE}
            if shape := content_problems("round", content):
                raise PrivacyError([f"ledger {self.path}: refusing to append a malformed entry: {p}" for p in shape])
            entry = RoundEntry.from_json(content | {"format": FORMAT, "kind": "round"})
        if entry.kind != "round":
            raise PrivacyError(f"ledger {self.path}: append records rounds, not {entry.kind} entries")
        if (policy := self.policy) is not None:
            self._check_policy(entry, policy)
        return self.write(entry)

    def _check_policy(self, entry: RoundEntry, policy: LedgerHeader) -> None:
        """A bound ledger's rounds name where their noise came from and record the policy in force."""
        problems = [f"missing field '{name}' (required once the ledger has a header)"
                    for name, value in (("rng", entry.rng), ("released", entry.released)) if value is MISSING]
        problems += [f"field '{name}' is {value!r}, but the policy in force says {want!r}"
                     for name, value, want in (("dataset", entry.dataset, policy.dataset),
                                               ("budget", entry.budget, policy.budget),
                                               ("delta", entry.delta, policy.delta)) if value != want]
        if entry.accountant.name != policy.accountant:
            problems.append(f"accountant {entry.accountant.name!r}, but the policy in force says "
                            f"{policy.accountant!r}")
        if problems:
            raise PrivacyError([f"ledger {self.path}: refusing to append: {p}" for p in problems])

    def write(self, entry: E) -> E:
        """Seal and durably append one entry (header, policy, round, repair); returns it sealed.

        Every entry gets a fresh 256-bit ``nonce`` from ``secrets``: the entry's hash leaves the node (the
        ledger head in each reply), and without a secret in it the server could recompute that hash for
        candidate datasets (the fingerprint) from values it knows or guesses.
        """
        if entry.seal is not None:
            raise PrivacyError(f"ledger {self.path}: refusing to write an entry again (line {entry.seal.seq})")
        prev = self.all_entries[-1]["hash"] if self.all_entries else GENESIS
        raw = sign({**entry.to_json(), "seq": len(self.all_entries) + 1, "prev": prev, "time": _utc_now(),
                    "key": self.key_id, "nonce": secrets.token_hex(NONCE_BYTES)}, self._key)
        if shape := entry_problems(raw):
            raise PrivacyError([f"ledger {self.path}: refusing to append a malformed entry: {p}" for p in shape])
        line = canonical(raw) + b"\n"
        if len(line) > MAX_LINE_BYTES:
            raise PrivacyError(f"ledger {self.path}: refusing to append an entry of {len(line)} bytes "
                               f"(at most {MAX_LINE_BYTES})")
        written = 0
        while written < len(line):  # one write in practice; loop in case the kernel splits it
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        if not self.all_entries:
            fsync_dir(self.path.parent)  # the file itself is new: make its directory entry durable
        sealed = dataclasses.replace(entry, seal=Seal.from_json(raw))
        typed = self.typed  # (built before the new line joins all_entries)
        self.all_entries.append(raw)
        typed.append(sealed)
        if self._known is not None:  # the file is now exactly the verified bytes plus this line
            digest = self._known.digest.copy()
            digest.update(line)
            self._known = _Known(self._known.size + len(line), digest, list(self.all_entries), list(typed))
            _remember(self.path, self.key_id, self._known)
        if self._witness is not None:
            self._witness.advance(WitnessMark(self.key_id, raw["seq"], raw["hash"]))
        return sealed

    def bind(self, header: LedgerHeader) -> None:
        """Start the ledger with ``header``, or record a policy change; refuse another node's ledger."""
        if not self.all_entries:
            self.write(PolicyEntry("header", header))
            return
        current, first = self.policy, self.header
        if first is None:
            raise PrivacyError(f"ledger {self.path} has no header (written before ledgers named their node): see "
                               "docs/ledger.md, 'Format 1 ledgers'")
        if first.node != header.node:
            raise PrivacyError(f"ledger {self.path} belongs to node {first.node}; this node is {header.node}")
        if current != header:
            self.write(PolicyEntry("policy", header))


class Ledger:
    """A node's ledger file, signed with the node's key; optionally bound to a header and guarded by a witness."""

    def __init__(self, path: Path, key: ed25519.Ed25519PrivateKey, *, header: LedgerHeader | None = None,
                 witness: Path | None = None) -> None:
        self.path = path
        self.key = key
        self.header = header
        self.witness = Witness(witness) if witness is not None else None

    @contextmanager
    def _locked(self) -> Iterator[tuple[int, _Known]]:
        """Lock, read and verify the whole ledger; refuse to go on if anything is wrong with it.

        Bytes identical to those this process last verified or wrote are not verified again (module docstring).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise PrivacyError(f"ledger {self.path} cannot be opened: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (problem := file_problem(fd, self.path)) is not None:
                raise PrivacyError(f"ledger {self.path}: {problem}")
            chunks = list(fd_chunks(fd, os.fstat(fd).st_size))
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            size, public = sum(map(len, chunks)), self.key.public_key()
            known = _KNOWN.get((str(self.path), key_id(public)))
            if known is None or known.size != size or known.digest.digest() != digest.digest():
                known = _Known(size, digest, self._verified(chunks, public), None)
            _remember(self.path, key_id(public), known)
            yield fd, _Known(known.size, known.digest.copy(), list(known.entries), known.typed)
        finally:
            os.close(fd)  # releases the lock

    def _verified(self, chunks: list[bytes], public: ed25519.Ed25519PublicKey) -> list[Entry]:
        """Every line parsed and verified (chain, hashes, signatures, shape); PrivacyError naming the problems."""
        parsed = parse_chunks(chunks, self.path)
        if problems := verify(parsed, {key_id(public): public}):
            raise PrivacyError(
                [f"ledger {self.path} {p}" for p in problems[:20]]
                + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
                + ["the node will not train on a damaged ledger: see docs/ledger.md, 'Recovery'"])
        return [e for _, e in parsed.entries]

    @contextmanager
    def session(self) -> Iterator[LedgerSession]:
        """The verified ledger, checked against its witness and bound to the header (when given)."""
        with self._locked() as (fd, known):
            session = LedgerSession(fd, self.path, known.entries, self.key, self.witness, known=known)
            if self.witness is not None:
                mark = self.witness.check(session.key_id, known.entries, self.path)
                if (head := session.head) is not None and head != mark:
                    self.witness.advance(head)  # an append that crashed before its witness update
            if self.header is not None:
                session.bind(self.header)
            yield session

    def adopt_witness(self) -> WitnessMark | None:
        """Start a witness at the ledger's current head (first start with a witness; an operator's decision)."""
        if self.witness is None:
            raise PrivacyError("this ledger has no witness path to adopt")
        with self._locked() as (fd, known):
            entries = known.entries
            head = LedgerSession(fd, self.path, entries, self.key, None).head
            current = self.witness.read()
            if current is not None:
                self.witness.check(key_id(self.key.public_key()), entries, self.path)
            if head is not None:
                self.witness.advance(head)
            return head

    def entries(self) -> list[RoundEntry]:
        """The round and repair entries of the verified ledger (typed), oldest first."""
        with self.session() as s:
            return list(s.entries)
