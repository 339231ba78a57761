"""The ledger file format: chain, signatures, torn lines, locking, header binding, and the node's signing key."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.common.errors import ConfigError, PrivacyError
from fedtune.common.ledger.chain import GENESIS, canonical, entry_hash, sign, verify
from fedtune.common.ledger.entry import AccountantRecord, LedgerHeader, RoundEntry
from fedtune.common.ledger.key import key_id, load_or_create_key, load_public_key, public_path
from fedtune.common.ledger.reader import MAX_LINE_BYTES, read
from fedtune.common.ledger.schema import event_from_json, event_to_json
from fedtune.common.ledger.store import Ledger
from fedtune.common.privacy.accountant import DpEvent


def fields(i: int = 1, decision: Literal["charged", "refused"] = "charged") -> RoundEntry:
    event = DpEvent(0.1, 1.0 + i / 10, 10, 1.0)
    return RoundEntry(
        run="r1", run_key="", round=i, dataset="d" * 64, fingerprint="d" * 64, decision=decision,
        reason="", event=event, delta=1e-5, accountant=AccountantRecord("rdp", "opacus", "1.6.0"), epsilon=0.5 * i,
        epsilon_round=0.5, budget=8.0, request={"epsilon": 8.0},
    )


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
    assert [e.sealed.seq for e in again.entries()] == [1, 2, 3]


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
    with pytest.raises(PrivacyError, match="ledger round entry: field 'decision' must be one of charged, refused"):
        replace(fields(2), decision="maybe")  # the typed entry refuses to exist
    bad = fields(2).to_json() | {"decision": "maybe"}  # the untyped call: refused by the session, as before
    with pytest.raises(PrivacyError, match="refusing to append a malformed entry: field 'decision' must be one of "
                                           "charged, refused"), ledger.session() as s:
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
    with pytest.raises(PrivacyError, match="field 'event.sampling' must be one of poisson, got 'shuffle'"):
        event_from_json(event_to_json(event) | {"sampling": "shuffle"})
    with pytest.raises(PrivacyError, match="field 'event.mechanism' must be one of subsampled-gaussian"):
        event_from_json(event_to_json(event) | {"mechanism": "laplace"})
    with pytest.raises(PrivacyError, match="unknown field 'event.extra'"):
        event_from_json(event_to_json(event) | {"extra": 1})


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
    key = load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_key(path)
    os.chmod(path, 0o600)
    other = load_or_create_key(tmp_path / "other.key")
    public_path(path).write_bytes(public_path(tmp_path / "other.key").read_bytes())
    assert key_id(other.public_key()) != key_id(key.public_key())  # really a foreign public key
    with pytest.raises(ConfigError, match="does not belong"):
        load_or_create_key(path)


HEADER = LedgerHeader("simulation:client-3", "d" * 64, 8.0, 1e-5, "rdp")


def bound_fields(i: int = 1) -> RoundEntry:
    return replace(fields(i), rng="secrets", released=("train-loss",))


def test_a_new_ledger_starts_with_its_signed_header(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    ledger = Ledger(tmp_path / "ledger.jsonl", key, header=HEADER)
    with ledger.session() as s:
        assert s.header == HEADER and s.policy == HEADER and s.entries == []
        entry = s.append(bound_fields(1))
        assert s.head is not None and (s.head.seq, s.head.head) == (2, entry.sealed.hash)
    parsed = read(ledger.path)
    kinds = [(e["kind"], e["seq"]) for _, e in parsed.entries]
    assert kinds == [("header", 1), ("round", 2)]
    assert parsed.entries[0][1]["node"] == "simulation:client-3"
    assert verify(parsed, {key_id(key.public_key()): key.public_key()}) == []
    assert [e.sealed.seq for e in ledger.entries()] == [2]  # entries(): the rounds, not the header


def test_a_policy_change_is_recorded_and_the_old_call_keeps_working(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    with Ledger(tmp_path / "ledger.jsonl", key, header=HEADER).session() as s:
        s.append(bound_fields(1))
    looser = replace(HEADER, budget=10.0)
    with Ledger(tmp_path / "ledger.jsonl", key, header=looser).session() as s:
        assert s.policy == looser and s.header == HEADER
        with pytest.raises(PrivacyError, match="field 'budget' is 8.0, but the policy in force says 10.0"):
            s.append(bound_fields(2))
        s.append(replace(bound_fields(2), budget=10.0))
    with Ledger(tmp_path / "ledger.jsonl", key, header=looser).session() as s:
        pass  # unchanged policy: nothing written
    with Ledger(tmp_path / "ledger.jsonl", key).session() as s:  # Ledger(path, key): no binding, appends rounds
        s.append(replace(bound_fields(3), budget=10.0))
    kinds = [e["kind"] for _, e in read(tmp_path / "ledger.jsonl").entries]
    assert kinds == ["header", "round", "policy", "round", "round"]


def test_a_bound_ledger_needs_rng_and_released_and_refuses_another_node(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    ledger = Ledger(tmp_path / "ledger.jsonl", key, header=HEADER)
    with pytest.raises(PrivacyError, match="missing field 'rng'"), ledger.session() as s:
        s.append(fields(1))
    other = Ledger(tmp_path / "ledger.jsonl", key, header=replace(HEADER, node="simulation:client-4"))
    with pytest.raises(PrivacyError, match="belongs to node simulation:client-3; this node is simulation:client-4"), \
            other.session():
        pass


def test_header_fields_are_validated() -> None:
    with pytest.raises(PrivacyError, match="ledger header field 'node' has an unexpected form"):
        LedgerHeader("hospital-a", "d", 8.0, 1e-5, "prv")
    with pytest.raises(PrivacyError, match="ledger header field 'delta' must be in"):
        LedgerHeader("simulation:client-1", "d", 8.0, 1.5, "prv")


def test_format_1_ledger_is_refused_naming_the_line(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    old = sign(fields(1).to_json() | {"format": "fedtune-ledger/1", "seq": 1, "prev": GENESIS, "time": "t",
                                       "key": key_id(key.public_key())}, key)
    (tmp_path / "ledger.jsonl").write_bytes(canonical(old) + b"\n")
    with pytest.raises(PrivacyError, match="line 1: format fedtune-ledger/1 is no longer accepted"), \
            Ledger(tmp_path / "ledger.jsonl", key, header=HEADER).session():
        pass


def test_reading_is_bounded_and_never_follows_symlinks(tmp_path: Path) -> None:
    ledger, key = make_ledger(tmp_path, 1)
    link = tmp_path / "link.jsonl"
    link.symlink_to(ledger.path)
    assert [str(p) for p in read(link).problems] == ["file: is a symbolic link; give the ledger file itself"]
    with pytest.raises(PrivacyError, match="cannot be opened"), Ledger(link, key).session():
        pass
    with open(ledger.path, "ab") as fh:
        fh.write(b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    problems = verify(read(ledger.path), {key_id(key.public_key()): key.public_key()})
    assert [str(p) for p in problems] == [f"line 2: longer than {MAX_LINE_BYTES} bytes ({MAX_LINE_BYTES + 10} "
                                          "bytes); not a ledger entry, not read"]


def test_node_identity_is_the_same_for_openssh_and_pem(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedtune.common.ledger.key import node_identity
    from fedtune.common.ledger.schema import NODE_ID

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "node.pub").write_bytes(public.public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH) + b" node-a\n")
    (tmp_path / "node.pem").write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    identity = node_identity(tmp_path / "node.pub")
    assert NODE_ID.fullmatch(identity) and identity == node_identity(tmp_path / "node.pem")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(ConfigError, match="is not an OpenSSH or PEM public key"):
        node_identity(tmp_path / "junk.pub")


def _count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from fedtune.common.ledger import store

    calls: list[int] = []
    real = store.verify
    monkeypatch.setattr(store, "verify", lambda parsed, keys: calls.append(len(parsed.entries)) or real(parsed, keys))
    return calls


def test_bytes_this_process_wrote_are_not_verified_again_but_a_new_process_verifies_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Incremental verification: a session over exactly the bytes the process last verified or wrote reuses the
    verified entries; anything else (here: a restarted process) parses and verifies every line."""
    from fedtune.common.ledger.store import forget_verified

    ledger, _ = make_ledger(tmp_path, 3)
    calls = _count_verifications(monkeypatch)
    for i in (4, 5):
        with ledger.session() as s:
            assert [e.round for e in s.entries] == list(range(1, i))
            s.append(fields(i))
    assert calls == []
    forget_verified()
    with ledger.session() as s:
        assert len(s.entries) == 5
    assert calls == [5]


@pytest.mark.parametrize("edit", ["same size, same times", "line appended by another writer", "truncated"])
def test_a_ledger_changed_after_this_process_verified_it_is_verified_in_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str) -> None:
    """Whatever changed the file — even an edit of the same size with its times put back — the next session
    verifies every line and refuses a tampered one."""
    ledger, key = make_ledger(tmp_path, 3)
    with ledger.session():
        pass  # known to this process now
    raw, info = ledger.path.read_bytes(), ledger.path.stat()
    calls = _count_verifications(monkeypatch)
    if edit == "same size, same times":
        tampered = raw.replace(b'"epsilon":1.0', b'"epsilon":0.1', 1)
        assert tampered != raw and len(tampered) == len(raw)
        ledger.path.write_bytes(tampered)
        os.utime(ledger.path, ns=(info.st_atime_ns, info.st_mtime_ns))
        with pytest.raises(PrivacyError, match="line 2: entry hash does not match its content"), ledger.session():
            pass
    elif edit == "line appended by another writer":
        last = json.loads(raw.splitlines()[-1])
        extra = sign({**fields(4).to_json(), "format": last["format"], "kind": "round", "seq": 4,
                      "prev": last["hash"], "time": last["time"], "key": last["key"], "nonce": "0" * 64}, key)
        ledger.path.write_bytes(raw + canonical(extra) + b"\n")
        with ledger.session() as s:
            assert [e.round for e in s.entries] == [1, 2, 3, 4]
    else:
        ledger.path.write_bytes(b"".join(raw.splitlines(keepends=True)[:2]))
        with ledger.session() as s:
            assert len(s.entries) == 2
    assert len(calls) == 1


def test_every_append_fsyncs_the_ledger_before_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Known bytes skip verification, never durability: each append's line is fsync'd before append returns."""
    ledger, _ = make_ledger(tmp_path, 1)
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(ledger.path.resolve()):
            synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    for i in (2, 3):
        with ledger.session() as s:
            s.append(fields(i))
            assert synced[-1] == ledger.path.stat().st_size  # the new line is on disk before append returned
    assert len(synced) == 2
