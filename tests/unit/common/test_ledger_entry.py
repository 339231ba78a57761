"""Typed ledger entries: validated at construction, and their JSON form is exactly what a line holds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.client.ledger_repair import repair_torn_ledger
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.chain import canonical
from fedtune.common.ledger.entry import (
    MISSING,
    AccountantRecord,
    LedgerHeader,
    PolicyEntry,
    RepairRecord,
    RoundEntry,
    Seal,
    entry_from_json,
)
from fedtune.common.ledger.schema import BadNumber, entry_problems, loads
from fedtune.common.privacy.accountant import DpEvent
from tests.unit.audit.ledgers import charge, four_rounds, lines, make_node, rechain, write

ROUND = RoundEntry(run="4", run_key="rk", round=1, dataset="ward-7", fingerprint="f" * 64, decision="charged",
                   reason="", event=DpEvent(0.5, 1.1, 2, 1.0), delta=1e-5,
                   accountant=AccountantRecord("rdp", "opacus", "1.6.0"), epsilon=1.2, epsilon_round=1.2,
                   projected=1.2, budget=8.0, request={"epsilon": 8.0}, rng="secrets", released=("train-loss",))
REPAIR = RepairRecord("ledger.jsonl.torn-0123456789abcdef", "e" * 64, 700, "torn-line")


def _ledger_lines(tmp_path: Path) -> list[bytes]:
    """Every kind of line a node writes: header, charges, a refusal, a policy change, a repair."""
    node = make_node(tmp_path / "n")
    four_rounds(node)
    charge(node, 5, header=replace(node.header, budget=7.0))  # a policy entry, then a refused round
    witness = node.witness.read_bytes()
    charge(node, 6, header=replace(node.header, budget=7.0))
    data = node.ledger_path.read_bytes()
    node.ledger_path.write_bytes(data[:-300])  # the last append was torn
    node.witness.write_bytes(witness)
    repair_torn_ledger(node.ledger_path, node.key, witness=node.witness)
    return node.ledger_path.read_bytes().splitlines()


def test_every_line_reads_back_to_exactly_its_json(tmp_path: Path) -> None:
    raw_lines = _ledger_lines(tmp_path)
    kinds = [json.loads(raw)["kind"] for raw in raw_lines]
    assert kinds == ["header", "round", "round", "round", "round", "policy", "round", "repair"]
    for raw in raw_lines:
        entry = entry_from_json(loads(raw))
        assert canonical(entry.to_json()) == raw  # same fields, same values, same bytes
        assert entry_from_json(entry.to_json()) == entry


def test_entries_of_the_previous_release_read_back_exactly(tmp_path: Path) -> None:
    """No nonce, no projected, request, rng or released: the fields an entry lacks stay absent."""
    node = make_node(tmp_path)
    four_rounds(node)
    old = lines(node.ledger_path)
    for i in range(len(old)):
        old = rechain(old, node.key, i, lambda e: {k: v for k, v in e.items()
                                                   if k not in ("nonce", "projected", "request", "rng", "released")})
    write(node.ledger_path, old)
    for raw in node.ledger_path.read_bytes().splitlines():
        entry = entry_from_json(loads(raw))
        assert canonical(entry.to_json()) == raw
    round_entry = entry_from_json(old[1])
    assert isinstance(round_entry, RoundEntry) and round_entry.rng is round_entry.projected  # both MISSING


def test_an_entry_carries_its_kind_and_only_the_fields_it_was_given() -> None:
    bare = RoundEntry(run="4", round=1, dataset="d", fingerprint="", decision="refused", reason="policy: x",
                      event=None, delta=1e-5, accountant=AccountantRecord("prv", "opacus", "1.6.0"), epsilon=0.0,
                      epsilon_round=0.0, budget=8.0)
    assert bare.to_json() == {
        "format": "fedtune-ledger/2", "kind": "round", "run": "4", "round": 1, "dataset": "d", "fingerprint": "",
        "decision": "refused", "reason": "policy: x", "event": None, "delta": 1e-5, "epsilon": 0.0,
        "epsilon_round": 0.0, "budget": 8.0, "accountant": {"name": "prv", "library": "opacus", "version": "1.6.0"}}
    assert ROUND.to_json()["released"] == ["train-loss"] and ROUND.to_json()["request"] == {"epsilon": 8.0}
    header = PolicyEntry("header", LedgerHeader("simulation:client-1", "ward-7", 8.0, 1e-5, "prv"))
    assert header.to_json() == {"format": "fedtune-ledger/2", "kind": "header", "node": "simulation:client-1",
                                "dataset": "ward-7", "budget": 8.0, "delta": 1e-5, "accountant": "prv"}
    with pytest.raises(PrivacyError, match="has not been written to a ledger"):
        _ = ROUND.sealed


@pytest.mark.parametrize(("change", "message"), [
    ({"decision": "maybe"}, "field 'decision' must be one of charged, refused, got 'maybe'"),
    ({"epsilon": float("nan")}, "field 'epsilon' must be in [0, 1e+09], got nan"),
    ({"epsilon": float("inf")}, "field 'epsilon' must be in [0, 1e+09], got inf"),
    ({"budget": 0.0}, "field 'budget' must be in (0, 1e+06], got 0.0"),
    ({"round": True}, "field 'round' must be an integer, got true/false"),
    ({"released": ("Train Loss",)}, "field 'released' holds 'Train Loss', not a metric name"),
    ({"rng": "seeded"}, "field 'rng' must be 'secrets' or 'seeded-insecure:<seed>', got 'seeded'"),
    ({"kind": "header"}, "field 'kind' must be one of round, repair, got 'header'"),
    ({"event": {"steps": 2}}, "field 'event' must be a DpEvent or NoneType, got dict"),
    ({"repair": REPAIR}, "unknown field 'repair'"),
    ({"kind": "repair"}, "missing field 'repair'"),
    ({"kind": "repair", "repair": REPAIR}, "unknown field 'request'"),
])
def test_a_malformed_round_entry_cannot_be_built(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PrivacyError) as err:
        replace(ROUND, **change)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_nested_records_and_seals_are_validated_too() -> None:
    with pytest.raises(PrivacyError, match="field 'accountant.version' has an unexpected form: '2.0.0'"):
        AccountantRecord("prv", "opacus", "2.0.0")
    with pytest.raises(PrivacyError, match="field 'repair.recovered' must be one of"):
        RepairRecord("x", "e" * 64, 1, "guess")
    with pytest.raises(PrivacyError, match="field 'hash' has an unexpected form"):
        Seal(1, "0" * 64, "2026-01-01T00:00:00.000Z", "ed25519:" + "a" * 32, "xyz", "A" * 86 + "==")
    with pytest.raises(PrivacyError, match="field 'kind' must be one of header, policy"):
        PolicyEntry("round", LedgerHeader("simulation:client-1", "d", 8.0, 1e-5, "prv"))  # type: ignore[arg-type]


def test_a_written_entry_is_not_written_again(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    charge(node, 1)
    with node.ledger().session() as s:
        (written,) = s.entries
        assert written.sealed.seq == 2 and written.to_json() == lines(node.ledger_path)[1]
        with pytest.raises(PrivacyError, match=r"refusing to write an entry again \(line 2\)"):
            s.append(written)
        with pytest.raises(PrivacyError, match="append records rounds, not repair entries"):
            s.append(replace(ROUND, kind="repair", repair=REPAIR, request=MISSING, rng=MISSING, released=MISSING))


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(-1.0, 2e9, allow_nan=False),
                    st.sampled_from(["", "charged", "refused", "prv", "round", "repair", "x" * 300, "secrets"]),
                    st.builds(BadNumber, st.sampled_from(["NaN", "1e999"])), st.lists(st.text(max_size=3), max_size=2),
                    st.dictionaries(st.sampled_from(["name", "steps", "sha256"]),
                                    st.one_of(st.integers(0, 3), st.builds(BadNumber, st.just("NaN"))), max_size=2))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(set(ROUND.to_json()) | {"event.steps", "accountant.name", "request.dp", "nonce",
                                                           "seq", "hash", "extra"})),
       value=_VALUES, drop=st.booleans())
def test_the_typed_form_accepts_exactly_the_lines_the_schema_accepts(field: str, value: Any, drop: bool) -> None:
    """Readers type the lines verify() found well-formed: that can never fail, and never admit a bad line."""
    raw: dict[str, Any] = ROUND.to_json() | {"seq": 2, "prev": "0" * 64, "time": "2026-01-01T00:00:00.000Z",
                                             "key": "ed25519:" + "a" * 32, "hash": "b" * 64, "sig": "A" * 86 + "=="}
    part, _, name = field.rpartition(".")
    target = raw[part] if part else raw
    if drop:
        target.pop(name, None)
    else:
        target[name] = value
    try:
        entry_from_json(raw)
        typed_ok = True
    except PrivacyError:
        typed_ok = False
    assert typed_ok == (not entry_problems(raw))
