"""Audit of a set of ledgers, and of the server's run record against them (receipts).

Each ledger is audited on its own (``ledger_audit.py``). With a run record, every
receipt must name a ledger that was audited (by its key id), and each audited ledger
must hold the entries its receipts name: a node whose ledger is missing from the
audit, shorter than what it reported, or different from it, fails.
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
    audit_ledger,
    checked_tolerance,
    summary,
)
from fedtune.common.receipts import RecordCheck, read_run_record


@dataclass(frozen=True)
class AuditReport:
    ledgers: list[LedgerAudit]
    tolerance: float
    record: RecordCheck | None = None  # the server's run record, when one was given
    record_problems: list[str] = field(default_factory=list)  # receipts that name no audited ledger

    @property
    def problems(self) -> list[str]:
        """Problems that belong to no single ledger (the run record)."""
        return (self.record.problems if self.record else []) + self.record_problems

    @property
    def ok(self) -> bool:
        return all(ledger.ok for ledger in self.ledgers) and not self.problems


def audit(specs: Sequence[LedgerSpec], keys: Mapping[str, ed25519.Ed25519PublicKey], *,
          tolerance: float = DEFAULT_TOLERANCE, record_dir: Path | None = None,
          server_key: ed25519.Ed25519PublicKey | None = None, strict_rng: bool = False) -> AuditReport:
    """Audit every ledger (and cross-check them with the run record in ``record_dir``)."""
    tolerance = checked_tolerance(tolerance)
    record = read_run_record(record_dir, server_key) if record_dir is not None else None
    receipts = record.record.receipts if record is not None and record.record is not None else ()
    ledgers = [audit_ledger(s, keys, tolerance=tolerance, receipts=receipts, strict_rng=strict_rng) for s in specs]
    audited = {ledger.key for ledger in ledgers}
    missing = sorted({(r.ledger_key, r.node) for r in receipts if r.ledger_key not in audited})
    problems = [f"the run record has receipts from node {node} (ledger key {key}), but no ledger signed by that "
                "key was audited" for key, node in missing]
    return AuditReport(ledgers, tolerance, record, problems)


def to_json(report: AuditReport) -> dict[str, Any]:
    """Machine-readable form (``fedtune-audit --json``); infinities become null; problems bounded per ledger."""
    record = report.record
    return {
        "ok": report.ok, "tolerance": report.tolerance,
        "run_record": None if record is None else {
            "path": str(record.path), "problems": report.problems, "notices": record.notices,
            "run": record.record.run if record.record else None,
            "receipts": len(record.record.receipts) if record.record else 0},
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
