"""The witness: a ledger rolled back, truncated or replaced after it was written is refused by the node."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.store import Ledger
from fedtune.common.ledger.witness import Witness, WitnessMark
from tests.unit.audit.ledgers import charge, four_rounds, lines, make_node, rechain, write


def test_every_append_advances_the_witness(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    entries = four_rounds(node)
    mark = Witness(node.witness).read()
    assert mark == WitnessMark(entries[-1]["key"], 5, entries[-1]["hash"])
    assert node.witness.parent != node.state  # kept apart from the ledger


def test_a_ledger_restored_from_an_older_backup_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    charge(node, 1)
    shutil.copy(node.ledger_path, tmp_path / "backup.jsonl")  # the nightly backup: header + round 1
    charge(node, 2)
    charge(node, 3)
    shutil.copy(tmp_path / "backup.jsonl", node.ledger_path)  # restored: rounds 2 and 3 are gone
    with pytest.raises(PrivacyError, match=r"ends at line 2, but its witness .* shows line 4 .* was written: the "
                                           "ledger was truncated or restored from an older copy"):
        charge(node, 4)


def test_a_deleted_last_line_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    four_rounds(node)
    node.ledger_path.write_text("".join(node.ledger_path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(PrivacyError, match="ends at line 4, but its witness"), node.ledger().session():
        pass


def test_a_rewritten_history_of_the_same_length_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    four_rounds(node)
    write(node.ledger_path, rechain(lines(node.ledger_path), node.key, 4, lambda e: e | {"reason": "edited"}))
    with pytest.raises(PrivacyError, match="line 5 is not the entry its witness .* recorded"), \
            node.ledger().session():
        pass


def test_a_missing_witness_is_refused_until_adopted(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    charge(node, 1)
    node.witness.unlink()
    with pytest.raises(PrivacyError, match="has 2 entries but its witness .* does not exist"), \
            node.ledger().session():
        pass
    assert node.ledger().adopt_witness() == WitnessMark(lines(node.ledger_path)[-1]["key"], 2,
                                                        lines(node.ledger_path)[-1]["hash"])
    charge(node, 2)


def test_ledger_ahead_of_its_witness_is_fine_and_catches_up(tmp_path: Path) -> None:
    """A crash between the ledger's fsync and the witness update leaves the ledger one entry ahead."""
    node = make_node(tmp_path)
    charge(node, 1)
    before = node.witness.read_text()
    with Ledger(node.ledger_path, node.key).session() as s:  # an append without the witness
        s.append(dict(lines(node.ledger_path)[-1]) | {"round": 2})  # (a copy of round 1's fields)
    assert node.witness.read_text() == before
    with node.ledger().session() as s:
        assert Witness(node.witness).read() == s.head


def test_witness_of_another_key_damage_and_moving_back_are_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    charge(node, 1)
    other = make_node(tmp_path / "other")
    charge(other, 1)
    shutil.copy(other.witness, node.witness)
    with pytest.raises(PrivacyError, match="is for ledger key .* but the ledger is signed by"), \
            node.ledger().session():
        pass
    node.witness.write_text("{not json")
    with pytest.raises(PrivacyError, match="is damaged"), node.ledger().session():
        pass
    mark = json.loads(other.witness.read_text())
    witness = Witness(other.witness)
    with pytest.raises(PrivacyError, match="refusing to move it back to line 1"):
        witness.advance(WitnessMark(mark["key"], 1, mark["head"]))


def test_a_session_rewrites_the_witness_only_when_the_ledger_is_ahead_of_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a session checks the witness every time; it writes (two fsyncs) only to catch up with an append
    that crashed before its witness update, and every append advances it."""
    from fedtune.common.ledger import witness as witness_module

    node = make_node(tmp_path)
    charge(node, 1)
    writes: list[int] = []
    real = witness_module.write_atomically
    monkeypatch.setattr(witness_module, "write_atomically",
                        lambda path, data, **kw: writes.append(json.loads(data)["seq"]) or real(path, data, **kw))
    with node.ledger().session():
        pass
    assert writes == []
    charge(node, 2)
    assert writes == [3]
    with Ledger(node.ledger_path, node.key).session() as s:  # an append without the witness
        s.append(dict(lines(node.ledger_path)[-1]) | {"round": 3})
    with node.ledger().session():
        pass
    assert writes == [3, 4]


def test_the_witness_directory_is_fsynced_when_the_witness_is_created(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A new witness must survive a crash (a ledger with entries and no witness is refused); a replaced one may
    come back as its previous mark, behind the ledger, which every session accepts and catches up with."""
    from fedtune.common.ledger import witness as witness_module

    calls: list[bool] = []
    real = witness_module.write_atomically
    monkeypatch.setattr(witness_module, "write_atomically",
                        lambda path, data, *, sync_dir=True: calls.append(sync_dir) or real(path, data,
                                                                                          sync_dir=sync_dir))
    node = make_node(tmp_path)
    charge(node, 1)  # the header creates the witness, the round replaces it
    charge(node, 2)
    assert calls == [True, False, False]
