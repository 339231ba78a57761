"""Audit of epsilon ledgers: integrity, signatures, and epsilon recomputed by two accountants.

For each ledger: every line must parse, chain (``seq``, ``prev``), hash and carry
a valid Ed25519 signature by a key the auditor was given (the key id in each
entry picks the key; one ledger, one key). Then the charged DP events of each
dataset are replayed in order, and at every entry the cumulative epsilon is
recomputed

- with Opacus under the entry's own accountant (``prv`` or ``rdp``), and
- with Google ``dp-accounting`` under its counterpart (``pld`` for ``prv``,
  ``rdp`` for ``rdp``: like is compared with like),

at the entry's delta. Either differing from the recorded epsilon by more than
``tolerance`` (relative), or any epsilon above the entry's budget, is a
violation. Nothing is repaired or skipped silently: every problem names its line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.accounting import COUNTERPART, DpEvent, dp_accounting_epsilon, opacus_epsilon
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger import Entry, Problem, event_from_json, read, shape_problems, verify

DEFAULT_TOLERANCE = 0.01  # relative; measured agreement is ~0.2% (PRV vs PLD) and ~0.1% (RDP vs RDP)
# Plus this much absolute: Opacus' PRV returns the upper end of an estimate +- eps_error (0.01 by default),
# so at small epsilons PRV sits ~0.01 above dp-accounting's PLD (e.g. 1.237 vs 1.227).
ABSOLUTE_SLACK = 0.01
MIN_REPLAY_SIGMA = 0.3  # below this the PRV accountant needs GBs; the node never plans under 0.5
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class EntryAudit:
    """One ledger line with the recomputed epsilons."""

    line: int
    time: str
    run: str
    round: int
    dataset: str
    decision: str
    event: DpEvent | None
    accountant: str
    delta: float
    budget: float
    recorded: float  # cumulative epsilon the node wrote (inf: trained without DP)
    opacus: float | None  # Opacus, same accountant (None: not replayed)
    independent: float | None  # dp-accounting counterpart (None: not replayed)
    reason: str = ""


@dataclass
class LedgerAudit:
    path: Path
    key: str | None  # key id that signed it (from line 1)
    entries: list[EntryAudit] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def datasets(self) -> dict[str, list[EntryAudit]]:
        out: dict[str, list[EntryAudit]] = {}
        for e in self.entries:
            out.setdefault(e.dataset, []).append(e)
        return out


@dataclass(frozen=True)
class AuditReport:
    ledgers: list[LedgerAudit]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(ledger.ok for ledger in self.ledgers)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _disagree(value: float, recorded: float, tolerance: float) -> bool:
    return abs(value - recorded) > tolerance * abs(recorded) + ABSOLUTE_SLACK


@functools.lru_cache(maxsize=256)
def _replay_cached(events: tuple[DpEvent, ...], delta: float, accountant: str) -> tuple[float, float]:
    return opacus_epsilon(events, delta, accountant), dp_accounting_epsilon(events, delta, COUNTERPART[accountant])


def _replay(events: Sequence[DpEvent], delta: float, accountant: str) -> tuple[float | None, float | None]:
    """(Opacus, dp-accounting) cumulative epsilon; (None, None) when no accountant here applies."""
    if accountant not in COUNTERPART or any(e.noise_multiplier < MIN_REPLAY_SIGMA for e in events):
        return None, None
    return _replay_cached(tuple(events), delta, accountant)


def _entry_problems(a: EntryAudit, tolerance: float) -> list[str]:
    out = []
    if math.isinf(a.recorded):
        out.append("the dataset was trained without DP: epsilon is unbounded, above any budget")
        return out
    if a.recorded > a.budget + BUDGET_SLACK:
        out.append(f"recorded epsilon {a.recorded:.6g} is above the budget {a.budget:g}")
    if a.opacus is None or a.independent is None:
        out.append(f"not replayed: accountant {a.accountant!r} unknown or a noise multiplier below "
                   f"{MIN_REPLAY_SIGMA}")
        return out
    if _disagree(a.opacus, a.recorded, tolerance):
        out.append(f"recorded epsilon {a.recorded:.6g}, but Opacus {a.accountant} gives {a.opacus:.6g}")
    if _disagree(a.independent, a.recorded, tolerance):
        out.append(f"recorded epsilon {a.recorded:.6g}, but dp-accounting {COUNTERPART[a.accountant]} gives "
                   f"{a.independent:.6g} ({100 * _rel(a.independent, a.recorded):.2f}% apart; tolerance "
                   f"{100 * tolerance:g}% + {ABSOLUTE_SLACK})")
    if a.independent > a.budget * (1 + tolerance) + ABSOLUTE_SLACK:
        out.append(f"dp-accounting {COUNTERPART[a.accountant]} puts epsilon at {a.independent:.6g}, "
                   f"above the budget {a.budget:g}")
    return out


def _audit_entry(number: int, entry: Entry, history: list[DpEvent | None], tolerance: float,
                 problems: list[Problem]) -> EntryAudit:
    """Recompute one entry's cumulative epsilon from ``history`` (charged events up to and including it)."""
    accountant = str(entry["accountant"].get("name", ""))
    delta = float(entry["delta"])
    opacus: float | None
    independent: float | None
    if any(e is None for e in history):
        opacus, independent = math.inf, math.inf
    else:
        opacus, independent = _replay([e for e in history if e is not None], delta, accountant)
    recorded = math.inf if entry["epsilon"] is None else float(entry["epsilon"])
    try:
        event = event_from_json(entry["event"])
    except PrivacyError:
        event = None
    audit = EntryAudit(number, entry["time"], entry["run"], entry["round"], entry["dataset"], entry["decision"],
                       event, accountant, delta, float(entry["budget"]), recorded, opacus, independent,
                       entry["reason"])
    problems += [Problem(number, p) for p in _entry_problems(audit, tolerance)]
    if entry["accountant"].get("library") != "opacus":
        problems.append(Problem(number, f"accountant library {entry['accountant'].get('library')!r}; "
                                        "this auditor replays Opacus ledgers"))
    return audit


def audit_ledger(path: Path, keys: Mapping[str, ed25519.Ed25519PublicKey],
                 tolerance: float = DEFAULT_TOLERANCE) -> LedgerAudit:
    """Verify one ledger and recompute every entry's epsilon; all problems are collected, none raised."""
    parsed = read(path)
    report = LedgerAudit(path, None, problems=verify(parsed, keys))
    histories: dict[str, list[DpEvent | None]] = {}
    for number, entry in parsed.entries:
        if shape_problems(entry):
            continue  # already reported by verify()
        report.key = report.key or entry["key"]
        history = histories.setdefault(entry["dataset"], [])
        if entry["decision"] == "charged":
            try:
                history.append(event_from_json(entry["event"]))
            except PrivacyError as err:
                report.problems.append(Problem(number, str(err)))
                continue
        report.entries.append(_audit_entry(number, entry, history, tolerance, report.problems))
    if not parsed.entries and not parsed.problems:
        report.problems.append(Problem(1, "the ledger is empty"))
    report.problems.sort(key=lambda p: p.line)
    return report


def audit(paths: Sequence[Path], keys: Mapping[str, ed25519.Ed25519PublicKey],
          tolerance: float = DEFAULT_TOLERANCE) -> AuditReport:
    if not 0 < tolerance < 1:
        raise PrivacyError(f"tolerance must be in (0, 1), got {tolerance}")
    return AuditReport([audit_ledger(p, keys, tolerance) for p in paths], tolerance)


def to_json(report: AuditReport) -> dict[str, Any]:
    """Machine-readable form (``fedtune-audit --json``); infinities become null."""
    def num(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    return {
        "ok": report.ok, "tolerance": report.tolerance,
        "ledgers": [{
            "path": str(ledger.path), "key": ledger.key, "ok": ledger.ok,
            "problems": [{"line": p.line, "message": p.message} for p in ledger.problems],
            "entries": [{
                "line": e.line, "time": e.time, "run": e.run, "round": e.round, "dataset": e.dataset,
                "decision": e.decision, "reason": e.reason, "accountant": e.accountant, "delta": e.delta,
                "budget": e.budget, "epsilon_recorded": num(e.recorded), "epsilon_opacus": num(e.opacus),
                "epsilon_dp_accounting": num(e.independent),
                "event": None if e.event is None else {
                    "sample_rate": e.event.sample_rate, "noise_multiplier": e.event.noise_multiplier,
                    "steps": e.event.steps, "clip_norm": e.event.clip_norm},
            } for e in ledger.entries],
        } for ledger in report.ledgers],
    }
