"""Every entry carries a fresh nonce, so the ledger head a node sends cannot be used to test datasets offline.

The server knows or can derive nearly every field of a round entry (its own request, the run, the round, N,
sigma, epsilon, the previous head, the time to the second); without a secret in the entry it could hash
candidate datasets' fingerprints until one matched the head the node reported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from fedtune.audit.fleet import audit
from fedtune.audit.ledger_audit import LedgerSpec
from fedtune.common.data.table import LabelledData
from fedtune.common.ledger import store as ledger_module
from fedtune.common.ledger.chain import entry_hash, verify
from fedtune.common.ledger.entry import LedgerHeader, RoundEntry
from fedtune.common.ledger.key import key_id, load_or_create_key
from fedtune.common.ledger.reader import read
from fedtune.common.ledger.store import Ledger
from fedtune.common.tasks import get_task
from tests.unit.audit.ledgers import NODE_A, charge, four_rounds, lines, make_node, rechain, write

HEADER = LedgerHeader("simulation:client-3", "ward-7", 8.0, 1e-5, "rdp")
ROWS = LabelledData(Dataset.from_dict({"text": ["chest pain, 54, admitted", "no findings", "fracture, left arm"],
                                       "label": [1, 0, 1]}), ["neg", "pos"])
NEIGHBOUR = LabelledData(Dataset.from_dict({"text": ["chest pain, 54, admitted", "no findings"],
                                            "label": [1, 0]}), ["neg", "pos"])


def round_fields(fingerprint: str) -> RoundEntry:
    return RoundEntry.from_json({
        "format": "fedtune-ledger/2", "kind": "round",
        "run": "4", "run_key": "rk", "round": 1, "dataset": "ward-7", "fingerprint": fingerprint,
        "decision": "charged", "reason": "", "delta": 1e-5, "budget": 8.0, "epsilon": 1.2, "epsilon_round": 1.2,
        "projected": 1.2, "event": {"mechanism": "subsampled-gaussian", "sampling": "poisson",
                                    "relation": "add/remove-one", "sample_rate": 0.5, "noise_multiplier": 1.1,
                                    "steps": 2, "clip_norm": 1.0},
        "accountant": {"name": "rdp", "library": "opacus", "version": "1.6.0"},
        "request": {"epsilon": 8.0, "delta": 1e-5}, "rng": "secrets", "released": [],
    })


def test_the_head_cannot_be_recomputed_from_the_true_rows_and_everything_the_server_knows(tmp_path: Path) -> None:
    task = get_task("classify")
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    with Ledger(tmp_path / "ledger.jsonl", key, header=HEADER).session() as s:
        entry = s.append(round_fields(task.fingerprint(ROWS))).to_json()
    header = lines(tmp_path / "ledger.jsonl")[0]
    assert all(len(e["nonce"]) == 64 for e in (header, entry))
    # The server's best reconstruction: every field but the nonce, with the true rows' fingerprint.
    known = {k: v for k, v in entry.items() if k not in ("hash", "sig", "nonce")}
    for rows in (ROWS, NEIGHBOUR):
        assert entry_hash(known | {"fingerprint": task.fingerprint(rows)}) != entry["hash"]
    assert entry_hash(known | {"nonce": entry["nonce"]}) == entry["hash"]  # the nonce is the only missing value


def test_identical_appends_get_different_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "_utc_now", lambda: "2026-01-01T00:00:00.000Z")
    key = load_or_create_key(tmp_path / "ledger-signing.key")
    entries = []
    for name in ("a", "b"):
        with Ledger(tmp_path / name / "ledger.jsonl", key).session() as s:  # no header: both start at GENESIS
            entries.append(s.append(round_fields("f" * 64)).to_json())
    a, b = ({k: v for k, v in e.items() if k not in ("hash", "sig", "nonce")} for e in entries)
    assert a == b and entries[0]["prev"] == entries[1]["prev"]  # same content, same predecessor
    assert entries[0]["nonce"] != entries[1]["nonce"] and entries[0]["hash"] != entries[1]["hash"]


@pytest.mark.parametrize(("nonce", "message"), [
    ("ab" * 31, "field 'nonce' has an unexpected form"),  # 62 hex digits
    ("AB" * 32, "field 'nonce' has an unexpected form"),  # upper case
    ("g" * 64, "field 'nonce' has an unexpected form"),
    ("a" * 65, "field 'nonce' is 65 characters long"),
    (7, "field 'nonce' must be a string, got int"),
])
def test_a_malformed_nonce_fails_verification_naming_the_line(tmp_path: Path, nonce: object, message: str) -> None:
    node = make_node(tmp_path)
    four_rounds(node)
    entries = rechain(lines(node.ledger_path), node.key, 2, lambda e: e | {"nonce": nonce})  # re-signed by the node
    write(node.ledger_path, entries)
    public = node.key.public_key()
    problems = [str(p) for p in verify(read(node.ledger_path), {key_id(public): public})]
    assert problems == [f"line 3: {message}" + problems[0].split(message, 1)[1]]


def test_ledgers_without_nonces_still_verify_and_audit_clean(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    four_rounds(node)
    old = lines(node.ledger_path)
    for i in range(len(old)):  # the previous version's ledger: no nonce anywhere, signed by the node
        old = rechain(old, node.key, i, lambda e: {k: v for k, v in e.items() if k != "nonce"})
    write(node.ledger_path, old)
    assert all("nonce" not in e for e in lines(node.ledger_path))
    public = node.key.public_key()
    report = audit([LedgerSpec(node.ledger_path, NODE_A)], {key_id(public): public})
    assert report.ok, [str(p) for ledger in report.ledgers for p in ledger.problems.listed()]
    node.witness.unlink()  # the rewritten file is a different history; adopt it as the node's own
    node.ledger().adopt_witness()
    entry = charge(node, 5)  # the node continues the old ledger; its new entries carry a nonce
    assert len(entry["nonce"]) == 64
    assert audit([LedgerSpec(node.ledger_path, NODE_A)], {key_id(public): public}).ok
