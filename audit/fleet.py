"""Audit of a set of ledgers, and of the server's run records against them (receipts).

Each ledger is audited on its own (``ledger_audit.py``). With one or more run records, every
receipt must name a ledger that was audited (by its key id) and carry the node's own signature
over what it says (the run, the round, the ledger line and head, the node's status), verified
with that ledger's public key: the server is not trusted, so a receipt the node did not sign
is a problem of the run record, never evidence against the node. Each audited ledger must hold
the entries its signed receipts name: a node whose ledger is missing from the audit, shorter
than what it reported, or different from it, fails.

Records of format 1 (written before nodes signed their replies) still read: their receipts are
cross-checked, but what they find is a notice, not held against the node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.audit.ledger_audit import (
    DEFAULT_TOLERANCE,
    MAX_LISTED,
    LedgerAudit,
    LedgerSpec,
    ReceiptSet,
    audit_ledger,
    checked_tolerance,
    summary,
)
from fedtune.common.ledger.receipts import RECORD_FORMAT_V1, RecordCheck, read_run_record
from fedtune.common.privacy.distributed import client_level_problem

PublicKey = ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class AuditReport:
    ledgers: list[LedgerAudit]
    tolerance: float
    records: list[RecordCheck] = field(default_factory=list)  # the server's run records, when given
    record_problems: list[str] = field(default_factory=list)  # receipts not signed by their node, or of no ledger

    @property
    def record(self) -> RecordCheck | None:
        """The first run record (when one was given)."""
        return self.records[0] if self.records else None

    @property
    def problems(self) -> list[str]:
        """Problems that belong to no single ledger (the run records), each naming its record."""
        return [f"{check.path}: {p}" for check in self.records for p in check.problems] + self.record_problems

    @property
    def ok(self) -> bool:
        return all(ledger.ok for ledger in self.ledgers) and not self.problems


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _receipt_set(check: RecordCheck, keys: Mapping[str, PublicKey], problems: list[str]) -> ReceiptSet | None:
    """The record's receipts the audit may hold against the nodes; every one not signed by its node is a problem.

    A receipt whose ledger key has no public key here names a ledger that cannot have verified either (that
    ledger's audit fails, or it was not audited: reported by :func:`audit`), so it is left out.
    """
    record = check.record
    if record is None:
        return None
    source = str(check.path)
    if record.format == RECORD_FORMAT_V1:
        check.notices.append(f"format {RECORD_FORMAT_V1}: its {len(record.receipts)} receipts carry no node "
                             "signature; they are cross-checked, but a mismatch is a notice, not held against "
                             "the node")
        return ReceiptSet(source, record.receipts, binding=False)
    signed = []
    for r in record.receipts:
        public = keys.get(r.ledger_key)
        if public is None:
            continue
        if (why := r.node_signature_problem(public)) is not None:
            problems.append(f"{source}: the receipt for round {r.round} (run {r.run}) from node {r.node}, ledger "
                            f"line {r.seq}, was not signed by the node: {why}")
            continue
        signed.append(r)
    return ReceiptSet(source, tuple(signed))


def audit(specs: Sequence[LedgerSpec], keys: Mapping[str, PublicKey], *, tolerance: float = DEFAULT_TOLERANCE,
          record_dir: Path | Sequence[Path] | None = None, server_key: PublicKey | Sequence[PublicKey] | None = None,
          strict_rng: bool = False) -> AuditReport:
    """Audit every ledger (and cross-check them with the run records in ``record_dir``: one run directory or
    several, each signed by ``server_key`` or one of several server keys)."""
    tolerance = checked_tolerance(tolerance)
    server_keys = _as_list(server_key)
    checks = [read_run_record(d, server_keys) for d in _as_list(record_dir)]
    problems: list[str] = []
    sets = [s for c in checks if (s := _receipt_set(c, keys, problems)) is not None]
    ledgers = [audit_ledger(s, keys, tolerance=tolerance, receipts=sets, strict_rng=strict_rng) for s in specs]
    audited = {ledger.key for ledger in ledgers}
    for check in checks:
        receipts = check.record.receipts if check.record is not None else ()
        missing = sorted({(r.ledger_key, r.node) for r in receipts if r.ledger_key not in audited})
        problems += [f"{check.path}: the run record has receipts from node {node} (ledger key {key}), but no ledger "
                     "signed by that key was audited" for key, node in missing]
        level = check.record.client_level if check.record is not None else None
        if level is not None and (why := client_level_problem(dict(level))) is not None:
            problems.append(f"{check.path}: {why}")
    return AuditReport(ledgers, tolerance, checks, problems)
def to_json(report: AuditReport) -> dict[str, Any]:
    """Machine-readable form (``fedtune-audit --json``); infinities become null; problems bounded per ledger."""
    return {
        "ok": report.ok, "tolerance": report.tolerance,
        "run_records": [{
            "path": str(check.path), "problems": check.problems, "notices": check.notices,
            "format": check.record.format if check.record else None,
            "run": check.record.run if check.record else None,
            "receipts": len(check.record.receipts) if check.record else 0,
        } for check in report.records],
        "record_problems": report.problems,
        "ledgers": [{
            "path": str(ledger.path), "key": ledger.key, "node": ledger.node, "ok": ledger.ok,
            "policies": [{"source": lim.source, "budget": lim.budget, "delta": lim.delta,
                          "accountant": lim.accountant, "dataset": lim.dataset} for lim in ledger.limits],
            "problems": [{"line": p.line, "message": p.message} for p in ledger.problems.listed()],
            "problems_not_listed": ledger.problems.more,
            "notices": [{"line": p.line, "message": p.message} for p in ledger.notices.listed()],
            "notices_not_listed": ledger.notices.more,
            "entries": [summary(e) for e in ledger.entries],
        } for ledger in report.ledgers],
        "max_listed": MAX_LISTED,
    }
