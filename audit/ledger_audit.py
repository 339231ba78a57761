"""Audit of one epsilon ledger: integrity, binding, limits from the policy, epsilon replayed twice.

For each ledger: every line must parse (bounded, see ``common/ledger/reader.py``), chain
(``seq``, ``prev``), hash and carry a canonical, valid Ed25519 signature by a key the
auditor was given. Line 1 must be the signed header; it binds the ledger to a node
(``--node``, ``--roster``) and states the policy. The limits every entry is held to
come from the auditor's ``--policy`` file when given, else from the signed header
and policy entries, never from the entry itself: an entry recording another
budget, delta, accountant or dataset than the policy in force is a violation.

The charged DP events of each dataset are then replayed in order, and at every
entry the cumulative epsilon is recomputed at the policy's delta

- with Opacus under the policy's accountant (``prv`` or ``rdp``), and
- with Google ``dp-accounting`` under its counterpart (``pld`` for ``prv``,
  ``rdp`` for ``rdp``: like is compared with like).

Limits are strict: the recorded epsilon and *both* replays must be <= the budget,
with no tolerance. The tolerance (relative, plus a small absolute slack for PRV's
estimate error) only decides whether the recorded epsilon is *consistent* with the
replays; it never lets an epsilon above the budget pass. Nothing is repaired or
skipped silently: every problem names its line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.audit.policy import AuditPolicy
from fedtune.audit.policy_changes import policy_change_problems
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.chain import Problem, verify
from fedtune.common.ledger.entry import MISSING, LedgerEntry, PolicyEntry, RepairRecord, RoundEntry, entry_from_json
from fedtune.common.ledger.reader import read
from fedtune.common.ledger.receipts import Receipt, cross_check
from fedtune.common.ledger.schema import RNG_SECURE, RNG_SEEDED, entry_problems
from fedtune.common.privacy.accountant import COUNTERPART, DpEvent, dp_accounting_epsilon, opacus_epsilon

DEFAULT_TOLERANCE = 0.01  # relative; measured agreement is ~0.2% (PRV vs PLD) and ~0.1% (RDP vs RDP)
# Plus this much absolute: Opacus' PRV returns the upper end of an estimate +- eps_error (0.01 by default),
# so at small epsilons PRV sits ~0.01 above dp-accounting's PLD (e.g. 1.237 vs 1.227).
ABSOLUTE_SLACK = 0.01
MIN_REPLAY_SIGMA = 0.3  # below this the PRV accountant needs GBs; the node never plans under 0.5
# (epsilon, delta)-DP lets a mechanism release an example outright with probability delta; a delta near 1/N
# is no guarantee at all. The audit fails any policy delta above this (NIST SP 800-226: delta << 1/N).
DEFAULT_MAX_DELTA = 1e-4
MAX_LISTED = 20  # problems listed per ledger; the rest are counted ("and N more")
MAX_KEPT = 1000  # problems kept in memory per ledger (all are counted)


@dataclass
class Findings:
    """Problems (or notices) of one ledger, bounded: the first MAX_KEPT are kept, all are counted."""

    kept: list[Problem] = field(default_factory=list)
    total: int = 0

    def add(self, problem: Problem) -> None:
        self.total += 1
        if len(self.kept) < MAX_KEPT:
            self.kept.append(problem)

    def extend(self, problems: Sequence[Problem]) -> None:
        for p in problems:
            self.add(p)

    def listed(self) -> list[Problem]:
        return sorted(self.kept, key=lambda p: p.line)[:MAX_LISTED]

    @property
    def more(self) -> int:
        return self.total - len(self.listed())

    def __bool__(self) -> bool:
        return self.total > 0


@dataclass(frozen=True)
class Limits:
    """The policy an entry is held to, and where it came from."""

    budget: float
    delta: float
    accountant: str
    dataset: str  # "" = any dataset
    source: str  # "--policy FILE", "header (line 1)", "policy entry (line 7)"

    @classmethod
    def of(cls, policy: AuditPolicy) -> Limits:
        return cls(policy.max_epsilon, policy.delta, policy.accountant, policy.dataset_id, f"--policy {policy.source}")

    @classmethod
    def from_entry(cls, number: int, entry: PolicyEntry) -> Limits:
        what = "header" if entry.kind == "header" else "policy entry"
        p = entry.policy
        return cls(float(p.budget), float(p.delta), p.accountant, p.dataset, f"{what} (line {number})")


@dataclass(frozen=True)
class ReceiptSet:
    """The receipts of one run record that a ledger is cross-checked against."""

    source: str  # the run record they come from (named in every finding)
    receipts: tuple[Receipt, ...]
    binding: bool = True  # False: receipts the node did not sign (format 1): findings are notices, not problems


@dataclass(frozen=True)
class LedgerSpec:
    """One ledger to audit and what the auditor expects of it."""

    path: Path
    node: str | None = None  # expected node identity (--node, or the roster's for this ledger file)
    policy: AuditPolicy | None = None  # the auditor's limits (--policy); else the signed header's
    roster: Mapping[str, str] | None = None  # node identity -> ledger key id (--roster)
    max_delta: float = DEFAULT_MAX_DELTA  # the largest policy delta accepted as a DP guarantee


@dataclass(frozen=True)
class EntryAudit:
    """One charge/refusal line with the recomputed epsilons."""

    line: int
    kind: str  # round | repair
    time: str
    run: str
    round: int
    dataset: str
    decision: str
    event: DpEvent | None
    accountant: str  # the accountant replayed (the policy's)
    delta: float  # the delta replayed at (the policy's)
    budget: float  # the budget in force (nan: no policy known)
    recorded: float  # cumulative epsilon the node wrote (inf: trained without DP)
    opacus: float | None  # Opacus, same accountant (None: not replayed)
    independent: float | None  # dp-accounting counterpart (None: not replayed)
    reason: str = ""
    rng: str = ""  # where the noise came from ("" = not recorded)
    released: tuple[str, ...] = ()  # metrics the node's policy released in plain text


@dataclass
class LedgerAudit:
    path: Path
    key: str | None = None  # key id that signed it
    node: str | None = None  # node named by its header
    limits: list[Limits] = field(default_factory=list)  # every policy in force, in order
    entries: list[EntryAudit] = field(default_factory=list)
    problems: Findings = field(default_factory=Findings)
    notices: Findings = field(default_factory=Findings)

    @property
    def ok(self) -> bool:
        return not self.problems

    def datasets(self) -> dict[str, list[EntryAudit]]:
        out: dict[str, list[EntryAudit]] = {}
        for e in self.entries:
            out.setdefault(e.dataset, []).append(e)
        return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _disagree(value: float, recorded: float, tolerance: float) -> bool:
    return abs(value - recorded) > tolerance * abs(recorded) + ABSOLUTE_SLACK


@functools.lru_cache(maxsize=256)
def _replay_cached(events: tuple[DpEvent, ...], delta: float, accountant: str) -> tuple[float, float]:
    return opacus_epsilon(events, delta, accountant), dp_accounting_epsilon(events, delta, COUNTERPART[accountant])


def replay(history: Sequence[DpEvent | None], delta: float, accountant: str) -> tuple[float | None, float | None]:
    """(Opacus, dp-accounting) cumulative epsilon; inf once a round trained without DP; None when not replayable."""
    if any(e is None for e in history):
        return math.inf, math.inf
    events = tuple(e for e in history if e is not None)
    if accountant not in COUNTERPART or (accountant == "prv" and any(e.noise_multiplier < MIN_REPLAY_SIGMA
                                                                      for e in events)):
        return None, None
    return _replay_cached(events, delta, accountant)


def _limit_problems(entry: RoundEntry, limits: Limits) -> list[str]:
    """An entry that records other limits than the policy in force."""
    where = f"the policy in force ({limits.source})"
    out = []
    if limits.dataset and entry.dataset != limits.dataset:
        out.append(f"charged to dataset {entry.dataset[:64]!r}, but {where} is for {limits.dataset[:64]!r}")
    if entry.budget != limits.budget:
        out.append(f"records budget {entry.budget:g}, but {where} allows {limits.budget:g}")
    if entry.delta != limits.delta:
        out.append(f"records delta {entry.delta:g}, but {where} sets delta {limits.delta:g}")
    if entry.accountant.name != limits.accountant:
        out.append(f"records accountant {entry.accountant.name}, but {where} sets {limits.accountant}")
    return out


def _epsilon_problems(a: EntryAudit, tolerance: float, strict: bool) -> list[str]:
    if math.isinf(a.recorded) or (a.opacus is not None and math.isinf(a.opacus)):
        return ["the dataset was trained without DP: epsilon is unbounded, above any budget"]
    out = []
    if strict and a.recorded > a.budget:
        out.append(f"recorded epsilon {a.recorded:.6g} is above the budget {a.budget:g}")
    if a.opacus is None or a.independent is None:
        return [*out, f"not replayed: a noise multiplier below {MIN_REPLAY_SIGMA} (PRV cannot replay it)"]
    counterpart = COUNTERPART[a.accountant]
    if _disagree(a.opacus, a.recorded, tolerance):
        out.append(f"recorded epsilon {a.recorded:.6g}, but Opacus {a.accountant} gives {a.opacus:.6g}")
    if _disagree(a.independent, a.recorded, tolerance):
        out.append(f"recorded epsilon {a.recorded:.6g}, but dp-accounting {counterpart} gives "
                   f"{a.independent:.6g} ({100 * _rel(a.independent, a.recorded):.2f}% apart; tolerance "
                   f"{100 * tolerance:g}% + {ABSOLUTE_SLACK})")
    if strict:
        for name, value in ((f"Opacus {a.accountant}", a.opacus), (f"dp-accounting {counterpart}", a.independent)):
            if value > a.budget:
                out.append(f"{name} replays epsilon {value:.6g} at delta {a.delta:g}, above the budget {a.budget:g}")
    return out


def _rng_findings(number: int, entry: RoundEntry, has_header: bool, strict_rng: bool, report: LedgerAudit) -> None:
    rng = entry.rng
    if rng is MISSING:
        message = "the entry does not say where its noise came from (field 'rng')"
        (report.problems if has_header else report.notices).add(Problem(number, message))
    elif rng != RNG_SECURE and rng.startswith(RNG_SEEDED):
        message = (f"noise from a seeded generator ({rng}): reproducible simulation only, not a production "
                   "guarantee (anyone who knows the seed can remove the noise)")
        (report.problems if strict_rng else report.notices).add(Problem(number, message))


@dataclass
class _Replay:
    """State carried through one ledger: the limits in force and each dataset's charged events."""

    limits: Limits | None
    has_header: bool
    auditor: bool  # the limits come from the auditor's --policy
    histories: dict[str, list[DpEvent | None]] = field(default_factory=dict)


def _policy_entry(number: int, entry: PolicyEntry, state: _Replay, spec: LedgerSpec, report: LedgerAudit) -> None:
    """A header or policy entry: the new limits, unless the auditor's --policy overrides them."""
    node_limits = Limits.from_entry(number, entry)
    report.limits.append(node_limits)
    if node_limits.delta > spec.max_delta:
        report.problems.add(Problem(number, _delta_problem(node_limits, spec.max_delta)))
    if not state.auditor:
        state.limits = node_limits
        return
    policy = spec.policy
    if policy is None:  # cannot happen: state.auditor means spec.policy was given
        return
    node = entry.policy
    if node.budget > policy.max_epsilon:
        report.problems.add(Problem(number, f"the node's policy allows budget {node.budget:g}, above "
                                            f"max-epsilon {policy.max_epsilon:g} in {policy.source}"))
    if node.delta > policy.delta:
        report.problems.add(Problem(number, f"the node's policy sets delta {node.delta:g}, above delta "
                                            f"{policy.delta:g} in {policy.source}"))
    if node.accountant != policy.accountant:
        report.problems.add(Problem(number, f"the node's policy uses accountant {node.accountant}, but "
                                            f"{policy.source} says {policy.accountant}"))
    if policy.dataset_id and node.dataset != policy.dataset_id:
        report.problems.add(Problem(number, f"the node's policy is for dataset {node.dataset[:64]!r}, but "
                                            f"{policy.source} names {policy.dataset_id[:64]!r}"))


def _delta_problem(limits: Limits, max_delta: float) -> str:
    return (f"the policy's delta {limits.delta:g} is above {max_delta:g}, the largest delta this audit accepts "
            "(--max-delta): with a delta that large, (epsilon, delta)-DP allows releasing an example outright "
            "with probability delta")


def _charge_entry(number: int, entry: RoundEntry, state: _Replay, tolerance: float, strict_rng: bool,
                  report: LedgerAudit) -> None:
    """Replay one round/repair entry against the limits in force."""
    history = state.histories.setdefault(entry.dataset, [])
    if entry.decision == "charged":
        history.append(entry.event)
    limits = state.limits
    if limits is not None:
        report.problems.extend([Problem(number, p) for p in _limit_problems(entry, limits)])
    delta = limits.delta if limits is not None else float(entry.delta)
    accountant = limits.accountant if limits is not None else entry.accountant.name
    opacus, independent = replay(history, delta, accountant)
    recorded = math.inf if entry.epsilon is None else float(entry.epsilon)
    audit = EntryAudit(number, entry.kind, entry.sealed.time, entry.run, entry.round, entry.dataset,
                       entry.decision, entry.event, accountant, delta, limits.budget if limits else math.nan,
                       recorded, opacus, independent, entry.reason, "" if entry.rng is MISSING else entry.rng,
                       () if entry.released is MISSING else entry.released)
    report.entries.append(audit)
    report.problems.extend([Problem(number, p) for p in _epsilon_problems(audit, tolerance, limits is not None)])
    spent = entry.epsilon_round
    if entry.decision == "refused" and spent not in (None, 0, 0.0):
        report.problems.add(Problem(number, f"a refusal that spent epsilon {spent:g} (a refused round never "
                                            "trains; was a charge relabelled?)"))
    if isinstance(r := entry.repair, RepairRecord):
        report.notices.add(Problem(number, f"repair of a torn line ({r.bytes} bytes kept as {r.evidence}, "
                                           f"sha256 {r.sha256[:16]}...): charged as spent ({r.recovered})"))
    else:
        _rng_findings(number, entry, state.has_header, strict_rng, report)


def _binding(first: tuple[int, LedgerEntry] | None, spec: LedgerSpec, report: LedgerAudit) -> None:
    header = first[1] if first is not None and first[0] == 1 and first[1].kind == "header" else None
    report.node = header.policy.node if isinstance(header, PolicyEntry) else None
    expected = spec.node
    if expected is not None and header is None:
        report.problems.add(Problem(1, f"no signed header: the ledger cannot be shown to belong to node {expected}"))
    elif expected is not None and report.node != expected:
        report.problems.add(Problem(1, f"the ledger belongs to node {report.node}, expected node {expected} "
                                       "(another node's ledger?)"))
    if spec.roster is not None:
        if report.node is None:
            report.problems.add(Problem(1, "no signed header: the ledger cannot be matched to a roster node"))
        elif report.node not in spec.roster:
            report.problems.add(Problem(1, f"the ledger belongs to node {report.node}, which is not in the roster"))
        elif report.key != spec.roster[report.node]:
            report.problems.add(Problem(1, f"signed by key {report.key}, but the roster gives node {report.node} "
                                           f"the key {spec.roster[report.node]}"))


def audit_ledger(spec: LedgerSpec, keys: Mapping[str, ed25519.Ed25519PublicKey], *,
                 tolerance: float = DEFAULT_TOLERANCE, receipts: Sequence[ReceiptSet] = (),
                 strict_rng: bool = False) -> LedgerAudit:
    """Verify one ledger and recompute every entry's epsilon; all problems are collected, none raised."""
    parsed = read(spec.path)
    report = LedgerAudit(spec.path)
    report.problems.extend(verify(parsed, keys))
    # The well-formed lines, typed (the typed form checks exactly what entry_problems does, so all of them convert).
    valid = [(n, entry_from_json(e)) for n, e in parsed.entries if not entry_problems(e)]
    report.key = valid[0][1].sealed.key if valid else None
    _binding(valid[0] if valid else None, spec, report)
    has_header = report.node is not None
    state = _Replay(Limits.of(spec.policy) if spec.policy else None, has_header, spec.policy is not None)
    if state.limits is not None:
        report.limits.append(state.limits)
        if state.limits.delta > spec.max_delta:
            report.problems.add(Problem(0, _delta_problem(state.limits, spec.max_delta)))
    if spec.policy is None and not has_header and valid:
        report.problems.add(Problem(1, "no signed header and no --policy: budget and delta cannot come from the "
                                       "ledger's own entries; give the node's policy file with --policy"))
    elif spec.policy is not None and not has_header and valid:
        report.notices.add(Problem(1, "no signed header: audited against --policy, but not bound to a node"))
    for number, entry in valid:
        if isinstance(entry, PolicyEntry):
            _policy_entry(number, entry, state, spec, report)
        else:
            _charge_entry(number, entry, state, tolerance, strict_rng, report)
    report.problems.extend(policy_change_problems(valid))
    for held in receipts if report.key is not None else ():
        found = cross_check(str(report.key), parsed.entries, held.receipts, held.source)
        if held.binding:
            report.problems.extend(found)
        else:
            report.notices.extend([Problem(p.line, f"{p.message}; an unsigned receipt (format 1), not held against "
                                                   "the node") for p in found])
    return report


def checked_tolerance(tolerance: float) -> float:
    """The tolerance may only be made stricter than the default."""
    if not 0 < tolerance <= DEFAULT_TOLERANCE:
        raise PrivacyError(f"tolerance must be in (0, {DEFAULT_TOLERANCE}], got {tolerance}: it can only make "
                           "the audit stricter")
    return tolerance


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def summary(entry: EntryAudit) -> dict[str, Any]:
    """One entry in the JSON report."""
    e = entry
    return {
        "line": e.line, "kind": e.kind, "time": e.time, "run": e.run, "round": e.round, "dataset": e.dataset,
        "decision": e.decision, "reason": e.reason, "accountant": e.accountant, "delta": e.delta,
        "budget": finite(e.budget), "epsilon_recorded": finite(e.recorded), "epsilon_opacus": finite(e.opacus),
        "epsilon_dp_accounting": finite(e.independent), "rng": e.rng or None, "released": list(e.released),
        "event": None if e.event is None else {
            "sample_rate": e.event.sample_rate, "noise_multiplier": e.event.noise_multiplier,
            "steps": e.event.steps, "clip_norm": e.event.clip_norm},
    }
