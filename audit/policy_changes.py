"""Policy changes a ledger may not contain, with or without the auditor's ``--policy``.

A node's budget belongs to its data and only ever shrinks as it is spent. So, whatever policy file
the auditor holds, a ledger fails when

- a ``policy`` entry raises the budget above the one in force before it (the header's, or the previous
  policy entry's): the epsilon already spent would be judged against a bigger allowance;
- a ``policy`` entry changes the dataset-id (``dataset``): the budget key, so a new id opens a fresh
  budget for what may be the same rows;
- the same data ``fingerprint`` appears in round entries under two different ``dataset`` ids: the same
  rows charged to two budgets.

Every problem names the line that introduced it (for the fingerprint, once per new dataset id).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.common.ledger.chain import Problem
from fedtune.common.ledger.entry import LedgerEntry, PolicyEntry, RoundEntry


def _policy_problems(number: int, entry: PolicyEntry, before: tuple[int, PolicyEntry]) -> list[Problem]:
    line, prev = before
    where = f"{'the header' if prev.kind == 'header' else 'the policy entry'} (line {line})"
    new, old = entry.policy, prev.policy
    out = []
    if new.budget > old.budget:
        out.append(Problem(number, f"the policy entry raises the budget from {old.budget:g} ({where}) to "
                                   f"{new.budget:g}: a dataset's budget never grows (what was spent still "
                                   "counts against the old one)"))
    if new.dataset != old.dataset:
        out.append(Problem(number, f"the policy entry changes the dataset-id from {old.dataset[:64]!r} "
                                   f"({where}) to {new.dataset[:64]!r}: a new dataset-id opens a fresh budget, "
                                   "possibly for the same rows (keep the dataset-id; train other data under a "
                                   "ledger of its own)"))
    return out


def _fingerprint_problem(number: int, entry: RoundEntry, seen: dict[str, dict[str, int]]) -> Problem | None:
    fingerprint, dataset = entry.fingerprint, entry.dataset
    if not fingerprint:
        return None
    datasets = seen.setdefault(fingerprint, {})
    if dataset in datasets:
        return None
    datasets[dataset] = number
    if len(datasets) == 1:
        return None
    first, line = next(iter(datasets.items()))
    return Problem(number, f"the data of line {line} (fingerprint {fingerprint[:16]}...), charged there to dataset "
                           f"{first[:64]!r}, is charged here to dataset {dataset[:64]!r}: the same rows under two "
                           "budgets")


def policy_change_problems(entries: Sequence[tuple[int, LedgerEntry]]) -> list[Problem]:
    """Budget raises, dataset-id changes and rows under two dataset ids, in well-formed ``entries`` (line, entry)."""
    out: list[Problem] = []
    in_force: tuple[int, PolicyEntry] | None = None
    seen: dict[str, dict[str, int]] = {}  # fingerprint -> dataset -> first line
    for number, entry in entries:
        if isinstance(entry, PolicyEntry):
            if entry.kind == "policy" and in_force is not None:
                out += _policy_problems(number, entry, in_force)
            in_force = (number, entry)
        elif entry.kind == "round" and (problem := _fingerprint_problem(number, entry, seen)) is not None:
            out.append(problem)
    return out
