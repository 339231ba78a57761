"""The ledger's entries as typed values (format ``fedtune-ledger/2``, fields as in docs/ledger.md).

A node builds a :class:`RoundEntry` (a round it charged or refused, or a torn round the repair charged) or
a :class:`PolicyEntry` (the header on line 1, or a later change of policy). Each is a frozen value,
validated at construction by the schema's own checks (``schema.py``), so a malformed entry is refused
before anything is signed. :meth:`LedgerSession.write <fedtune.common.ledger.store.LedgerSession.write>`
adds the :class:`Seal` (line, chain link, time, key, nonce, hash, signature) and returns the sealed entry.

``to_json()`` is the entry's JSON object exactly as its line holds it (without the seal until it is
written); ``from_json()`` reads a line back into the typed value. Readers call ``from_json`` only on
lines the chain verified (``chain.verify``): the hash is checked over exactly the JSON that was signed,
and unknown fields are reported there, on the raw dicts.

Field values mirror the JSON one to one: ``None`` is JSON ``null``; :data:`MISSING` marks an optional
field the entry does not carry (entries of earlier releases, repair entries), which ``to_json()`` leaves out.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.schema import (
    ENVELOPE,
    FORMAT,
    POLICY,
    SEAL,
    Entry,
    bad_numbers,
    content_problems,
    event_from_json,
    event_to_json,
    part_problems,
    seal_problems,
)
from fedtune.common.privacy.accountant import DpEvent, accountant_record

ACCOUNTING_KINDS = ("round", "repair")  # entries that charge or refuse a round
POLICY_KINDS = ("header", "policy")  # entries that state the policy the charges after them are held to


class Missing(enum.Enum):
    """An optional field the entry does not carry: ``to_json()`` leaves it out."""

    FIELD = "missing"

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing.FIELD


def _refuse(what: str, problems: list[str]) -> None:
    if problems:
        raise PrivacyError([f"{what}: {p}" for p in problems])


@dataclass(frozen=True)
class Seal:
    """What the ledger adds when it writes an entry; the hash covers everything but ``hash`` and ``sig``."""

    seq: int  # line number, from 1
    prev: str  # hash of the previous entry (64 zeros on line 1)
    time: str  # UTC, ISO 8601 with milliseconds
    key: str  # signing key id: "ed25519:" + 32 hex digits
    hash: str  # sha256 of the canonical JSON of the entry without hash and sig
    sig: str  # Ed25519 signature over the 32 hash bytes, canonical base64
    nonce: str | Missing = MISSING  # 64 hex digits, fresh per entry; MISSING on entries written before nonces

    def __post_init__(self) -> None:
        _refuse("ledger entry seal", seal_problems(self.to_json()))

    def to_json(self) -> Entry:
        out: Entry = {"seq": self.seq, "prev": self.prev, "time": self.time, "key": self.key, "hash": self.hash,
                      "sig": self.sig}
        return out if self.nonce is MISSING else out | {"nonce": self.nonce}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Seal:
        _refuse("ledger entry seal", seal_problems({k: v for k, v in raw.items() if k in SEAL or k == "nonce"}))
        return cls(raw["seq"], raw["prev"], raw["time"], raw["key"], raw["hash"], raw["sig"],
                   raw.get("nonce", MISSING))


@dataclass(frozen=True)
class AccountantRecord:
    """The accountant an entry's epsilons were computed with."""

    name: str  # "prv" | "rdp"
    library: str  # "opacus"
    version: str  # the library's version (1.5.x and 1.6.x are known)

    def __post_init__(self) -> None:
        _refuse("ledger entry", part_problems("accountant", self.to_json()))

    @classmethod
    def of(cls, name: str) -> AccountantRecord:
        """The node's own accountant ``name``, with the library version installed here."""
        return cls.from_json(accountant_record(name))

    def to_json(self) -> Entry:
        return {"name": self.name, "library": self.library, "version": self.version}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> AccountantRecord:
        _refuse("ledger entry", part_problems("accountant", raw))
        return cls(raw["name"], raw["library"], raw["version"])


@dataclass(frozen=True)
class RepairRecord:
    """What a torn-line repair kept and how it recovered the torn round (client/ledger_repair.py)."""

    evidence: str  # file name of the evidence file holding the torn bytes, next to the ledger
    sha256: str  # sha256 of those bytes
    bytes: int  # their length
    recovered: str  # torn-line | no-dp | run-maximum | refusal

    def __post_init__(self) -> None:
        _refuse("ledger entry", part_problems("repair", self.to_json()))

    def to_json(self) -> Entry:
        return {"evidence": self.evidence, "sha256": self.sha256, "bytes": self.bytes, "recovered": self.recovered}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RepairRecord:
        _refuse("ledger entry", part_problems("repair", raw))
        return cls(raw["evidence"], raw["sha256"], raw["bytes"], raw["recovered"])


@dataclass(frozen=True)
class LedgerHeader:
    """Who keeps this ledger and under which policy: the content of the header and of policy entries."""

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


def _content(raw: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The content fields of a line (all but format, kind and the seal); refuses another format."""
    if raw.get("format") != FORMAT:
        _refuse(f"ledger {kind} entry", [f"field 'format' must be {FORMAT!r}, got {str(raw.get('format'))[:64]!r}"])
    content = {k: v for k, v in raw.items() if k not in ENVELOPE}
    _refuse(f"ledger {kind} entry", content_problems(kind, content))
    return content


def _seal(raw: Mapping[str, Any]) -> Seal | None:
    """The seal of a line; None for the JSON of an entry not written yet (it has no seal field at all)."""
    return Seal.from_json(raw) if any(name in raw for name in (*SEAL, "nonce")) else None


@dataclass(frozen=True)
class PolicyEntry:
    """The header (line 1: the node and its policy) or a policy entry (a later change of that policy)."""

    kind: Literal["header", "policy"]
    policy: LedgerHeader
    seal: Seal | None = None  # None until the ledger writes it

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            _refuse("ledger entry", [f"field 'kind' must be one of {', '.join(POLICY_KINDS)}, got {self.kind!r}"])
        if not isinstance(self.policy, LedgerHeader) or not isinstance(self.seal, Seal | None):
            raise PrivacyError(f"ledger {self.kind} entry: a LedgerHeader and a Seal (or None) are expected, got "
                               f"{type(self.policy).__name__} and {type(self.seal).__name__}")

    def to_json(self) -> Entry:
        out = {"format": FORMAT, "kind": self.kind, **self.policy.fields()}
        return out if self.seal is None else out | self.seal.to_json()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PolicyEntry:
        kind = raw.get("kind")
        if kind != "header" and kind != "policy":
            raise PrivacyError(f"ledger entry: field 'kind' must be one of header, policy, got {str(kind)[:64]!r}")
        return cls(kind, LedgerHeader.from_entry(_content(raw, kind)), _seal(raw))

    @property
    def sealed(self) -> Seal:
        """The seal of an entry read from or written to a ledger; PrivacyError for one not written yet."""
        if self.seal is None:
            raise PrivacyError(f"this {self.kind} entry has not been written to a ledger")
        return self.seal


@dataclass(frozen=True, kw_only=True)
class RoundEntry:
    """A round the node charged or refused (kind ``round``), or a torn round the repair charged (``repair``).

    The epsilons are cumulative for ``dataset`` under the policy in force; ``None`` (JSON null) is unbounded
    (a round trained without DP), or for ``projected`` a plan that was never made.
    """

    kind: Literal["round", "repair"] = "round"
    run: str  # Flower run id of the request
    run_key: str | Missing = MISSING  # the server's settings hash, kept when it resumes a run ("" = none)
    round: int  # server round (0: not known, for a repair)
    dataset: str  # budget key: the policy's dataset-id
    fingerprint: str  # sha256 over the node's training examples ("" when the rows were never read)
    decision: Literal["charged", "refused"]
    reason: str  # why it was refused ("policy: ...", "budget: ..."); "" when charged
    event: DpEvent | None  # the DP event charged (or that would have been); None: none planned, or no DP
    delta: float  # the policy's delta, at which the epsilons are accounted
    accountant: AccountantRecord
    epsilon: float | None  # cumulative epsilon of dataset after this entry (unchanged by a refusal)
    epsilon_round: float | None  # epsilon added by this entry (0 for a refusal)
    projected: float | None | Missing = MISSING  # cumulative epsilon had the round been charged
    budget: float  # the policy's max-epsilon
    request: Mapping[str, Any] | Missing = MISSING  # what the server asked (a round entry's only)
    rng: str | Missing = MISSING  # "secrets" or "seeded-insecure:<seed>"; required once a ledger has a header
    released: tuple[str, ...] | Missing = MISSING  # metrics released in plain text; required with a header
    repair: RepairRecord | Missing = MISSING  # what the repair kept (a repair entry's only)
    seal: Seal | None = None  # None until the ledger writes it

    def __post_init__(self) -> None:
        if isinstance(self.released, list):
            object.__setattr__(self, "released", tuple(self.released))
        if isinstance(self.request, Mapping):
            object.__setattr__(self, "request", MappingProxyType(dict(self.request)))
        problems = self._type_problems()
        if not problems and self.kind not in ACCOUNTING_KINDS:
            problems = [f"field 'kind' must be one of {', '.join(ACCOUNTING_KINDS)}, got {str(self.kind)[:64]!r}"]
        content = {} if problems else self._content()
        problems = problems or bad_numbers(content) or content_problems(self.kind, content)
        _refuse(f"ledger {str(self.kind)[:64]} entry", problems)

    def _type_problems(self) -> list[str]:
        """Typed members of another type (their JSON form is checked by the schema)."""
        want = (("event", (DpEvent, type(None))), ("accountant", (AccountantRecord,)),
                ("repair", (RepairRecord, Missing)), ("seal", (Seal, type(None))))
        return [f"field '{name}' must be a {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}"
                for name, types in want if not isinstance(value := getattr(self, name), types)]

    def _content(self) -> Entry:
        out: Entry = {
            "run": self.run, "round": self.round, "dataset": self.dataset, "fingerprint": self.fingerprint,
            "decision": self.decision, "reason": self.reason, "event": event_to_json(self.event),
            "delta": self.delta, "accountant": self.accountant.to_json(), "epsilon": self.epsilon,
            "epsilon_round": self.epsilon_round, "budget": self.budget,
        }
        optional = {"run_key": self.run_key, "projected": self.projected, "rng": self.rng,
                    "request": dict(self.request) if isinstance(self.request, Mapping) else self.request,
                    "released": list(self.released) if isinstance(self.released, tuple) else self.released,
                    "repair": self.repair.to_json() if isinstance(self.repair, RepairRecord) else self.repair}
        return out | {name: value for name, value in optional.items() if value is not MISSING}

    def to_json(self) -> Entry:
        out = {"format": FORMAT, "kind": self.kind, **self._content()}
        return out if self.seal is None else out | self.seal.to_json()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RoundEntry:
        """The typed entry of a round or repair line (or of an entry's JSON before it was written: no seal)."""
        kind = raw.get("kind")
        if kind != "round" and kind != "repair":
            raise PrivacyError(f"ledger entry: field 'kind' must be one of round, repair, got {str(kind)[:64]!r}")
        c = _content(raw, kind)
        optional: dict[str, Any] = {k: c[k] for k in ("run_key", "projected", "rng", "request") if k in c}
        if "released" in c:
            optional["released"] = tuple(c["released"])
        if "repair" in c:
            optional["repair"] = RepairRecord.from_json(c["repair"])
        return cls(kind=kind, run=c["run"], round=c["round"], dataset=c["dataset"], fingerprint=c["fingerprint"],
                   decision=c["decision"], reason=c["reason"], event=event_from_json(c["event"]), delta=c["delta"],
                   accountant=AccountantRecord.from_json(c["accountant"]), epsilon=c["epsilon"],
                   epsilon_round=c["epsilon_round"], budget=c["budget"], seal=_seal(raw), **optional)

    @property
    def sealed(self) -> Seal:
        """The seal of an entry read from or written to a ledger; PrivacyError for one not written yet."""
        if self.seal is None:
            raise PrivacyError(f"this {self.kind} entry has not been written to a ledger")
        return self.seal


LedgerEntry = PolicyEntry | RoundEntry


def entry_from_json(raw: Mapping[str, Any]) -> LedgerEntry:
    """The typed form of a verified ledger line: a :class:`PolicyEntry` or a :class:`RoundEntry`."""
    return PolicyEntry.from_json(raw) if raw.get("kind") in POLICY_KINDS else RoundEntry.from_json(raw)
