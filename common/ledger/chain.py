"""The chain: canonical JSON, entry hashes, signatures, and verification of a parsed ledger (docs/ledger.md).

Every line is one entry in canonical JSON (sorted keys, no spaces, ASCII). Its
``hash`` is sha256 over the canonical JSON of the entry without ``hash`` and
``sig``; ``prev`` is the previous line's hash (64 zeros on line 1); ``seq`` is
the line number; ``sig`` is the node key's Ed25519 signature over the 32 hash
bytes. Line 1 is a signed header naming the node, its dataset and its policy
(budget, delta, accountant); a later ``policy`` entry records a change of policy.
Editing, deleting, inserting or reordering lines, or re-signing with another key,
breaks a check that names the line.

:func:`verify` works on the raw JSON objects that ``reader.py`` parsed, so that the
hash is checked over exactly what was signed and unknown fields are reported;
readers turn verified lines into typed entries (``entry.py``) afterwards.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.ledger.schema import Entry, entry_problems

if TYPE_CHECKING:
    from fedtune.common.ledger.reader import ParsedLedger

GENESIS = "0" * 64


@dataclass(frozen=True)
class Problem:
    """One integrity problem, tied to a 1-based line of the ledger file (0: the file as a whole)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else f"file: {self.message}"


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
