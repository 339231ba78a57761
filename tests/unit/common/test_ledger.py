"""The ledger file format: chain, signatures, torn lines, locking, and the node's signing key."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.accounting import DpEvent
from fedtune.common.errors import ConfigError, PrivacyError
from fedtune.common.ledger import (
    GENESIS,
    Ledger,
    canonical,
    entry_hash,
    event_from_json,
    event_to_json,
    read,
    verify,
)
from fedtune.common.ledger_key import key_id, load_or_create_key, load_public_key, public_path


def fields(i: int = 1, decision: str = "charged") -> dict:
    event = DpEvent(0.1, 1.0 + i / 10, 10, 1.0)
    return {
        "run": "r1", "run_key": "", "round": i, "dataset": "d" * 64, "fingerprint": "d" * 64, "decision": decision,
        "reason": "", "event": event_to_json(event), "delta": 1e-5,
        "accountant": {"name": "rdp", "library": "opacus", "version": "1.6.0"}, "epsilon": 0.5 * i,
        "epsilon_round": 0.5, "budget": 8.0, "request": {"epsilon": 8.0},
    }


def make_ledger(tmp_path: Path, n: int = 3) -> tuple[Ledger, ed25519.Ed25519PrivateKey]:
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    ledger = Ledger(tmp_path / "ledger.jsonl", key)
    with ledger.session() as s:
        for i in range(1, n + 1):
            s.append(fields(i))
    return ledger, key


def test_appended_entries_chain_and_verify(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path)
    parsed = read(ledger.path)
    assert verify(parsed, {key_id(key.public_key()): key.public_key()}) == []
    entries = [e for _, e in parsed.entries]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] == entry_hash(a) for a, b in zip(entries, entries[1:], strict=False))
    for raw, entry in zip(ledger.path.read_bytes().splitlines(), entries, strict=True):
        assert raw == canonical(entry)  # one canonical JSON object per line


def test_session_continues_an_existing_ledger(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path, 2)
    again = Ledger(ledger.path, load_or_create_key(tmp_path / "ledger-signing.key"))  # a restarted process
    with again.session() as s:
        assert len(s.entries) == 2
        s.append(fields(3))
    assert [e["seq"] for e in again.entries()] == [1, 2, 3]


def test_torn_last_line_is_reported_and_blocks_the_node(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path)
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])  # a crash in the middle of appending line 3
    problems = verify(read(ledger.path), {key_id(key.public_key()): key.public_key()})
    assert [(p.line, "torn" in p.message) for p in problems] == [(3, True)]
    with pytest.raises(PrivacyError, match="line 3: torn"), ledger.session():
        pass
    assert ledger.path.read_bytes() == data[:-40]  # never silently repaired


def test_malformed_entry_is_not_appended(tmp_path: Path) -> None:
    ledger, _ = make_ledger(tmp_path, 1)
    bad = fields(2) | {"decision": "maybe"}
    with pytest.raises(PrivacyError, match="decision must be charged or refused"), ledger.session() as s:
        s.append(bad)
    assert len(ledger.entries()) == 1


def _append_many(path: str, key_path: str, n: int) -> None:
    ledger = Ledger(Path(path), load_or_create_key(Path(key_path)))
    for i in range(n):
        with ledger.session() as s:
            s.append(fields(i + 1))


def test_concurrent_appends_from_two_processes_keep_the_chain(tmp_path: Path) -> None:
    key_path = tmp_path / "ledger-signing.key"
    key = load_or_create_key(key_path)
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), str(key_path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    parsed = read(path)
    assert len(parsed.entries) == 30
    assert verify(parsed, {key_id(key.public_key()): key.public_key()}) == []


def test_event_json_roundtrip_and_unknown_mechanisms() -> None:
    event = DpEvent(0.125, 0.9, 24, 1.0)
    assert event_from_json(json.loads(json.dumps(event_to_json(event)))) == event
    assert event_from_json(None) is None
    with pytest.raises(PrivacyError, match="only poisson"):
        event_from_json(event_to_json(event) | {"sampling": "shuffle"})


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.0, 1.0, 1), (0.1, 0.0, 1), (0.1, 1.0, 0), (1.5, 1.0, 3)])
def test_dp_events_are_validated(q: float, sigma: float, steps: int) -> None:
    with pytest.raises(PrivacyError):
        DpEvent(q, sigma, steps)


def test_key_is_created_private_exported_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ledger-signing.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_path(path) == tmp_path / "keys" / "ledger-signing.pub"
    assert load_public_key(public_path(path)) == key.public_key()
    before = path.read_bytes()
    again = load_or_create_key(path)
    assert path.read_bytes() == before
    assert key_id(again.public_key()) == key_id(key.public_key())


def test_loose_key_permissions_and_foreign_public_key_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger-signing.key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_key(path)
    os.chmod(path, 0o600)
    other = load_or_create_key(tmp_path / "other.key")
    public_path(path).write_bytes(public_path(tmp_path / "other.key").read_bytes())
    assert other is not None
    with pytest.raises(ConfigError, match="does not belong"):
        load_or_create_key(path)
