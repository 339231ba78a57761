"""What a ledger entry may contain (format ``fedtune-ledger/2``): fields, types, limits, known values.

One table per entry kind; :func:`entry_problems` checks an entry against it and
names every bad field (``field 'event.steps': ...``). Values are bounded (string
lengths, integer ranges, finite numbers) so that nothing an attacker writes into a
ledger can crash or exhaust the auditor. JSON numbers that Python could not hold
faithfully (NaN, Infinity, 1e999, integers of more than 18 digits) are parsed into
:class:`BadNumber` placeholders by :func:`loads` and reported here, field by field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.common.errors import PrivacyError
from fedtune.common.privacy.accountant import RELATION, SAMPLING, DpEvent

FORMAT = "fedtune-ledger/2"
FORMAT_V1 = "fedtune-ledger/1"
KINDS = ("header", "policy", "round", "repair")
DECISIONS = ("charged", "refused")
MECHANISM = "subsampled-gaussian"
ACCOUNTANTS = ("prv", "rdp")
ACCOUNTANT_LIBRARY = "opacus"
KNOWN_LIBRARY_VERSIONS = re.compile(r"1\.[56]\.\d+")  # the Opacus releases this code was checked against
RNG_SECURE = "secrets"
RNG_SEEDED = "seeded-insecure:"
MAX_INT_DIGITS = 18
MAX_TEXT = 4096  # reasons and request values
MAX_ID = 256  # ids, names, dataset keys
MAX_SEQ = 10**12  # largest sequence number (line) an entry, a reply or a receipt may name
HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")
NODE_ID = re.compile(r"sha256:[0-9a-f]{64}|simulation:client-\d{1,9}")
SIGNATURE_CHARS = 88  # base64 of a 64-byte Ed25519 signature

Entry = dict[str, Any]
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class BadNumber:
    """A JSON number the ledger does not allow, kept as its text so the problem can quote it."""

    text: str


class DuplicateField(ValueError):
    """A JSON object names the same field twice (the last one would silently win)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateField(key)
        out[key] = value
    return out


def _float(text: str) -> float | BadNumber:
    value = float(text)
    return value if math.isfinite(value) else BadNumber(text)


def _int(text: str) -> int | BadNumber:
    return BadNumber(text if len(text) <= 40 else text[:20] + "...") if len(text.lstrip("-")) > MAX_INT_DIGITS \
        else int(text)


def loads(raw: bytes) -> Any:
    """JSON with every non-finite or oversized number turned into a :class:`BadNumber`.

    Raises ``json.JSONDecodeError``, ``UnicodeDecodeError``, :class:`DuplicateField` or
    ``RecursionError`` (absurd nesting) for text that is not one JSON value.
    """
    return json.loads(raw, parse_float=_float, parse_int=_int, parse_constant=BadNumber,
                      object_pairs_hook=_pairs)


def bad_numbers(value: Any, path: str = "") -> list[str]:
    """``field 'a.b': ...`` for every :class:`BadNumber` inside ``value``."""
    if isinstance(value, BadNumber):
        return [f"field '{path}': {value.text} is not a finite number the ledger allows"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in bad_numbers(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in bad_numbers(v, f"{path}[{i}]")]
    return []


def _number(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Check:
    def check(v: Any) -> str | None:
        kinds = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds):
            return f"must be {'an integer' if integer else 'a number'}, got {_kind(v)}"
        if math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v!r}"
        return None
    return check


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _text(limit: int, pattern: re.Pattern[str] | None = None, choices: tuple[str, ...] = ()) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {_kind(v)}"
        if len(v) > limit:
            return f"is {len(v)} characters long; the limit is {limit}"
        if choices and v not in choices:
            return f"must be one of {', '.join(choices)}, got {v[:64]!r}"
        if pattern is not None and not pattern.fullmatch(v):
            return f"has an unexpected form: {v[:80]!r}"
        return None
    return check


def _kind(v: Any) -> str:
    return "true/false" if isinstance(v, bool) else ("null" if v is None else type(v).__name__)


def signature_problem(v: Any) -> str | None:
    if not isinstance(v, str) or len(v) != SIGNATURE_CHARS:
        return f"must be the base64 of a 64-byte signature ({SIGNATURE_CHARS} characters)"
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64"
    if base64.b64encode(raw).decode() != v:
        return "is not in canonical base64 (the unused low bits of its last character were changed)"
    return None


def _rng(v: Any) -> str | None:
    if (problem := _text(MAX_ID)(v)) is not None:
        return problem
    if v == RNG_SECURE or re.fullmatch(re.escape(RNG_SEEDED) + r"\d{1,20}", v):
        return None
    return f"must be {RNG_SECURE!r} or '{RNG_SEEDED}<seed>', got {v[:64]!r}"


def _released(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > 64:
        return f"must be a list of at most 64 metric names, got {_kind(v)}"
    bad = [x for x in v if not isinstance(x, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", x)]
    return f"holds {bad[0]!r}, not a metric name" if bad else None


def _object(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"must be an object, got {_kind(v)}"


EVENT: dict[str, Check] = {
    "mechanism": _text(MAX_ID, choices=(MECHANISM,)),
    "sampling": _text(MAX_ID, choices=(SAMPLING,)),
    "relation": _text(MAX_ID, choices=(RELATION,)),
    "sample_rate": _number(0.0, 1.0, lo_open=True),
    "noise_multiplier": _number(0.0, 1e6, lo_open=True),
    "steps": _number(1, 1e9, integer=True),
    "clip_norm": _number(0.0, 1e6, lo_open=True),
}
ACCOUNTANT: dict[str, Check] = {
    "name": _text(MAX_ID, choices=ACCOUNTANTS),
    "library": _text(MAX_ID, choices=(ACCOUNTANT_LIBRARY,)),
    "version": _text(MAX_ID, KNOWN_LIBRARY_VERSIONS),
}
REPAIR: dict[str, Check] = {
    "evidence": _text(MAX_ID, re.compile(r"[A-Za-z0-9._-]+")),
    "sha256": _text(64, HEX64),
    "bytes": _number(1, 2**40, integer=True),
    "recovered": _text(MAX_ID, choices=("torn-line", "no-dp", "run-maximum", "refusal")),
}
COMMON: dict[str, Check] = {
    "format": _text(MAX_ID, choices=(FORMAT,)), "kind": _text(MAX_ID, choices=KINDS),
    "seq": _number(1, MAX_SEQ, integer=True), "prev": _text(64, HEX64), "time": _text(40),
    "key": _text(MAX_ID, KEY_ID), "hash": _text(64, HEX64), "sig": signature_problem,
}
POLICY: dict[str, Check] = {
    "node": _text(MAX_ID, NODE_ID), "dataset": _text(MAX_ID, re.compile(r".+")),
    "budget": _number(0.0, 1e6, lo_open=True), "delta": _number(0.0, 1.0, lo_open=True, hi_open=True),
    "accountant": _text(MAX_ID, choices=ACCOUNTANTS),
}
CHARGE: dict[str, Check] = {
    "run": _text(MAX_ID), "round": _number(0, 1e12, integer=True), "dataset": _text(MAX_ID, re.compile(r".+")),
    "fingerprint": _text(MAX_ID), "decision": _text(MAX_ID, choices=DECISIONS), "reason": _text(MAX_TEXT),
    "event": lambda v: None if v is None else _object(v), "delta": _number(0.0, 1.0, lo_open=True, hi_open=True),
    "accountant": _object, "epsilon": _optional(_number(0.0, 1e9)), "epsilon_round": _optional(_number(0.0, 1e9)),
    "budget": _number(0.0, 1e6, lo_open=True),
}
# A fresh random value in every entry the node writes: without it, the entry hash (the ledger head the
# server receives) would be a function of values the server knows or can guess, and of the data fingerprint,
# so the server could test candidate datasets offline. Optional: entries written before it verify unchanged.
OPTIONAL_COMMON: dict[str, Check] = {"nonce": _text(64, HEX64)}
OPTIONAL_CHARGE: dict[str, Check] = {
    "run_key": _text(MAX_ID), "projected": _optional(_number(0.0, 1e9)), "request": _object,
    "rng": _rng, "released": _released,
}
FIELDS: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {  # kind -> (required, optional)
    "header": (COMMON | POLICY, OPTIONAL_COMMON),
    "policy": (COMMON | POLICY, OPTIONAL_COMMON),
    "round": (COMMON | CHARGE, OPTIONAL_COMMON | OPTIONAL_CHARGE),
    "repair": (COMMON | CHARGE | {"repair": _object}, OPTIONAL_COMMON | {
        "run_key": _text(MAX_ID), "projected": OPTIONAL_CHARGE["projected"]}),
}
NESTED: dict[str, dict[str, Check]] = {"event": EVENT, "accountant": ACCOUNTANT, "repair": REPAIR}
# What the ledger adds when it writes an entry (its place in the chain, time, key, hash, signature, nonce);
# everything else, but ``format`` and ``kind``, is the entry's content.
SEAL: dict[str, Check] = {name: COMMON[name] for name in ("seq", "prev", "time", "key", "hash", "sig")}
ENVELOPE = frozenset(("format", "kind", *SEAL, *OPTIONAL_COMMON))


def _fields(obj: Mapping[str, Any], required: Mapping[str, Check], optional: Mapping[str, Check],
            prefix: str = "") -> list[str]:
    out = [f"missing field '{prefix}{name}'" for name in required if name not in obj]
    for name, value in obj.items():
        check = required.get(name) or optional.get(name)
        if check is None:
            out.append(f"unknown field '{prefix}{str(name)[:64]}'")
        elif (problem := check(value)) is not None:
            out.append(f"field '{prefix}{name}' {problem}")
        elif isinstance(value, dict) and name in NESTED:
            out += _fields(value, NESTED[name], {}, f"{prefix}{name}.")
    return out


def entry_problems(entry: Mapping[str, Any]) -> list[str]:
    """Every way ``entry`` departs from format 2 (empty = well-formed); each names its field."""
    if numbers := bad_numbers(dict(entry)):
        return numbers
    fmt = entry.get("format")
    if fmt == FORMAT_V1:
        return [f"format {FORMAT_V1} is no longer accepted: it has no signed header binding it to a node and a "
                "policy (see docs/ledger.md, 'Format 1 ledgers')"]
    if fmt != FORMAT:
        return [f"field 'format' must be {FORMAT!r}, got {str(fmt)[:64]!r}" if "format" in entry
                else "missing field 'format'"]
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in FIELDS:  # (a list or an object is not even hashable)
        return [f"field 'kind' must be one of {', '.join(KINDS)}, got {str(kind)[:64]!r}" if "kind" in entry
                else "missing field 'kind'"]
    required, optional = FIELDS[kind]
    return _fields(entry, required, optional)


def content_problems(kind: str, content: Mapping[str, Any]) -> list[str]:
    """Every way the content of an entry of ``kind`` (all but format, kind and the seal) departs from format 2."""
    if not isinstance(kind, str) or kind not in FIELDS:
        return [f"field 'kind' must be one of {', '.join(KINDS)}, got {str(kind)[:64]!r}"]
    required, optional = FIELDS[kind]
    return _fields(content, {k: v for k, v in required.items() if k not in ENVELOPE},
                   {k: v for k, v in optional.items() if k not in ENVELOPE})


def seal_problems(seal: Mapping[str, Any]) -> list[str]:
    """Every way the seal of an entry (seq, prev, time, key, hash, sig, nonce) departs from format 2."""
    return _fields(seal, SEAL, OPTIONAL_COMMON)


def part_problems(name: str, part: Mapping[str, Any]) -> list[str]:
    """Every way the nested object ``name`` (event, accountant, repair) departs from format 2 (``name.field``)."""
    return _fields(part, NESTED[name], {}, f"{name}.")


def event_to_json(event: DpEvent | None) -> dict[str, Any] | None:
    """The ledger's form of a DP event (None: a round trained without DP)."""
    if event is None:
        return None
    return {"mechanism": MECHANISM, "sampling": SAMPLING, "relation": RELATION,
            "sample_rate": event.sample_rate, "noise_multiplier": event.noise_multiplier,
            "steps": event.steps, "clip_norm": event.clip_norm}


def event_from_json(raw: Mapping[str, Any] | None) -> DpEvent | None:
    """Inverse of :func:`event_to_json`; PrivacyError, naming the field, for anything no accountant here replays."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PrivacyError(f"field 'event' must be an object, got {_kind(raw)}")
    if problems := bad_numbers(dict(raw), "event") or _fields(raw, EVENT, {}, "event."):
        raise PrivacyError(problems)
    return DpEvent(float(raw["sample_rate"]), float(raw["noise_multiplier"]), raw["steps"], float(raw["clip_norm"]))
