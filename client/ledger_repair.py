"""Repair of a torn ledger that never under-counts: keep the bytes, charge the round.

A torn last line is an append that was interrupted before its fsync returned. The
node only trains after the append returns, so the round most likely never trained;
but "most likely" is not a privacy guarantee. The repair therefore

1. moves the torn bytes, verbatim, to an evidence file next to the ledger
   (``ledger.jsonl.torn-<sha256 prefix>``, written and fsync'd before anything else),
2. truncates the ledger to its last complete line, and
3. appends a signed ``repair`` entry that charges the torn round as spent:
   - its own DP event, when the torn bytes still hold it (a canonical entry lists
     ``event`` after ``accountant``, ``budget``, ``dataset``, ``decision``,
     ``delta`` and the epsilons, about 300-500 bytes into the line);
   - a torn refusal (``"decision":"refused"`` readable) charges nothing: a refused
     round never trains;
   - otherwise, when the torn bytes name the run, the most expensive event that run
     charged before (a run keeps one noise level, so its rounds cost the same);
   - otherwise the repair is refused, with the reason: charging a guess could
     under-count, and the ledger stays torn (the node keeps refusing to train).

The charge is worked out before anything is written, so a refused repair changes
nothing; all of it happens under the ledger's lock. Every step can be re-run after
a crash: a pending evidence file whose digest no repair entry names is finished on
the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.durable import fsync_dir, write_atomically
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.chain import verify
from fedtune.common.ledger.entry import AccountantRecord, RepairRecord, RoundEntry
from fedtune.common.ledger.key import key_id
from fedtune.common.ledger.reader import fd_chunks, file_problem, parse_chunks
from fedtune.common.ledger.schema import DuplicateField, Entry, event_from_json, loads
from fedtune.common.ledger.store import LedgerSession
from fedtune.common.ledger.witness import Witness
from fedtune.common.privacy.accountant import DpEvent, opacus_epsilon

EVIDENCE_SUFFIX = ".torn-"


@dataclass(frozen=True)
class Repair:
    """What a repair did: the evidence file and the signed entry that charged (or refused) the torn round."""

    evidence: Path
    entry: RoundEntry  # the repair entry, sealed
    recovered: str  # torn-line | run-maximum | refusal


def _field(torn: bytes, name: str, pattern: str) -> str | None:
    match = re.search(rb'"' + name.encode() + rb'":(' + pattern.encode() + rb")[,}]", torn)
    return match.group(1).decode() if match else None


def _recovered(torn: bytes) -> dict[str, Any]:
    """Whatever complete fields of a canonical entry the torn prefix still holds."""
    out: dict[str, Any] = {}
    for name in ("dataset", "decision", "run", "run_key", "fingerprint"):
        text = _field(torn, name, r'"[^"\\]{0,256}"')
        if text is not None:
            out[name] = text[1:-1]
    round_text = _field(torn, "round", r"\d{1,12}")
    if round_text is not None:
        out["round"] = int(round_text)
    for name in ("delta", "budget"):
        number = _field(torn, name, r"[0-9][0-9.e+-]{0,30}")
        try:
            value = float(number) if number is not None else math.nan
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            out[name] = value
    accountant = re.match(rb'\{"accountant":\{"library":"opacus","name":"(prv|rdp)"', torn)
    if accountant:
        out["accountant"] = accountant.group(1).decode()
    if b'"event":null,' in torn:  # a round trained without DP: its epsilon is unbounded
        out["no_dp"] = True
    event_text = _field(torn, "event", r"\{[^{}]{0,1024}\}")
    if event_text is not None:
        with contextlib.suppress(PrivacyError, ValueError, DuplicateField):  # invalid: treated as absent
            out["event"] = event_from_json(loads(event_text.encode()))
    return out


def _run_maximum(history: list[RoundEntry], run: str, delta: float, accountant: str) -> DpEvent | None:
    """The most expensive single event ``run`` charged (by its epsilon alone)."""
    events = [e.event for e in history if e.run == run and e.decision == "charged" and e.event is not None]
    costs = [(opacus_epsilon([e], delta, accountant), e) for e in events if e is not None]
    return max(costs, key=lambda c: c[0])[1] if costs else None


def _torn_event(got: dict[str, Any], mine: list[RoundEntry], delta: float, accountant: str,
                torn: bytes, evidence: Path) -> tuple[DpEvent | None, str]:
    """What to charge for the torn round, and how it was recovered; PrivacyError when only a guess is left."""
    if got.get("decision") == "refused":
        return None, "refusal"
    if got.get("no_dp"):
        return None, "no-dp"
    if got.get("event") is not None:
        return got["event"], "torn-line"
    if got.get("run") and (event := _run_maximum(mine, got["run"], delta, accountant)) is not None:
        return event, "run-maximum"
    raise PrivacyError(
        f"the torn line ({len(torn)} bytes, kept in {evidence}) holds neither its DP event nor a run that charged "
        "before: any charge would be a guess that might under-count, so the ledger is not repaired. See "
        "docs/ledger.md, 'Torn last line'")


def _limits(session: LedgerSession, got: dict[str, Any]) -> tuple[str, float, str, float]:
    """(dataset, delta, accountant, budget) the repair is charged under: the policy in force, else the ledger's."""
    policy, history = session.policy, session.entries
    last = history[-1] if history else None
    if policy is not None:
        return got.get("dataset") or policy.dataset, policy.delta, policy.accountant, policy.budget
    if last is not None:
        return got.get("dataset") or last.dataset, float(last.delta), last.accountant.name, float(last.budget)
    if all(k in got for k in ("dataset", "delta", "accountant", "budget")):
        return got["dataset"], got["delta"], got["accountant"], got["budget"]
    raise PrivacyError("the torn line is the ledger's first and does not hold its dataset, delta, accountant and "
                       "budget: nothing can be charged safely, so nothing is repaired")


def _repair_entry(session: LedgerSession, torn: bytes, evidence: Path) -> tuple[RoundEntry, str]:
    """The repair entry: the torn round charged as spent (or a readable refusal)."""
    got = _recovered(torn)
    dataset, delta, accountant, budget = _limits(session, got)
    mine = [e for e in session.entries if e.dataset == dataset]
    event, recovered = _torn_event(got, mine, delta, accountant, torn, evidence)
    history = [e.event for e in mine if e.decision == "charged"]
    events = [e for e in history if e is not None]
    before = math.inf if len(events) < len(history) else opacus_epsilon(events, delta, accountant)
    if recovered == "refusal":
        after = before
    elif recovered == "no-dp" or event is None or math.isinf(before):
        after = math.inf
    else:
        after = opacus_epsilon([*events, event], delta, accountant)
    entry = RoundEntry(
        kind="repair", run=got.get("run", ""), run_key=got.get("run_key", ""), round=got.get("round", 0),
        dataset=dataset, fingerprint=got.get("fingerprint", ""),
        decision="refused" if recovered == "refusal" else "charged",
        reason=f"repair: torn line charged as spent ({recovered})", event=event,
        delta=delta, accountant=AccountantRecord.of(accountant),
        epsilon=after if math.isfinite(after) else None,
        epsilon_round=after - before if math.isfinite(after) else None, budget=budget,
        repair=RepairRecord(evidence.name, hashlib.sha256(torn).hexdigest(), len(torn), recovered),
    )
    return entry, recovered


def _pending(path: Path, entries: list[RoundEntry]) -> tuple[Path, bytes] | None:
    """An evidence file of an interrupted repair (no repair entry names its digest yet)."""
    repaired = {e.repair.sha256 for e in entries if isinstance(e.repair, RepairRecord)}
    for candidate in sorted(path.parent.glob(path.name + EVIDENCE_SUFFIX + "*")):
        if candidate.name.endswith(".tmp"):
            continue
        data = candidate.read_bytes()
        if hashlib.sha256(data).hexdigest() not in repaired:
            return candidate, data
    return None


def _evidence_path(path: Path, torn: bytes) -> Path:
    return path.with_name(path.name + EVIDENCE_SUFFIX + hashlib.sha256(torn).hexdigest()[:16])


def _verified(fd: int, path: Path, key: ed25519.Ed25519PrivateKey) -> tuple[list[Entry], int, int]:
    """The complete entries (everything but a torn tail must verify), their byte length, the file size."""
    if (problem := file_problem(fd, path)) is not None:
        raise PrivacyError(f"ledger {path}: {problem}")
    size = os.fstat(fd).st_size
    parsed = parse_chunks(fd_chunks(fd, size), path)
    torn_problem = parsed.problems[-1] if parsed.torn_bytes else None  # parse_chunks reports the torn tail last
    public = key.public_key()
    if others := [p for p in verify(parsed, {key_id(public): public}) if p is not torn_problem]:
        raise PrivacyError([f"ledger {path} {p}" for p in others[:20]]
                           + ["only a torn last line can be repaired; anything else means the ledger was changed"])
    return [e for _, e in parsed.entries], parsed.complete_bytes, size


def repair_torn_ledger(path: Path, key: ed25519.Ed25519PrivateKey, *, witness: Path | None = None) -> Repair:
    """Repair a ledger whose only problem is a torn last line (see the module docstring); PrivacyError otherwise.

    Everything happens under the ledger's lock. The charge is worked out first: when the repair is
    refused, nothing has changed. Then the evidence is made durable, the torn tail cut, the entry appended.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise PrivacyError(f"ledger {path} cannot be opened: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries, complete, size = _verified(fd, path, key)
        guard = Witness(witness) if witness is not None else None
        session = LedgerSession(fd, path, entries, key, guard)
        if guard is not None:
            guard.check(session.key_id, entries, path)
        pending = None if size > complete else _pending(path, session.entries)
        if size == complete and pending is None:
            raise PrivacyError(f"ledger {path} has no torn last line: nothing to repair")
        if pending is not None:  # a repair that crashed after cutting the line: finish it
            evidence, torn = pending
        else:
            torn = os.pread(fd, size - complete, complete)
            evidence = _evidence_path(path, torn)
        repair, recovered = _repair_entry(session, torn, evidence)  # may refuse: nothing changed yet
        if pending is None:
            write_atomically(evidence, torn)  # the torn bytes, verbatim, durable before the ledger changes
            os.ftruncate(fd, complete)
            os.fsync(fd)
        entry = session.write(repair)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return Repair(evidence, entry, recovered)
