"""The ledger's witness: the newest head the node ever made durable, kept in a second place.

A ledger can lose complete entries from its end without breaking its chain: a
disk restored from an older backup, a file copied back over, a truncation. The
remaining prefix verifies. The witness is a small file, replaced atomically after
every append, holding the ledger key id, the sequence number and the hash of the
last entry (a monotonic counter with the head's hash). It lives apart from the
ledger (another volume, outside the state directory's backups), so restoring one
does not restore the other. Before every session the node checks that its ledger
still holds that entry with that hash; a ledger that is behind (shorter) or has
diverged (other content at that line) is refused.

Why a counter and not a second copy of the ledger: the check needs only "is the
ledger at least this long, with this entry at that line", which 200 bytes answer;
a full copy would double the disk writes, hold the same private history in a second
place, and invite "fixing" one copy from the other, which is exactly the rollback
the witness is there to catch.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.durable import write_atomically
from fedtune.common.errors import PrivacyError
from fedtune.common.ledger.schema import HEX64, KEY_ID

WITNESS_FORMAT = "fedtune-ledger-witness/1"
MAX_WITNESS_BYTES = 4096


@dataclass(frozen=True)
class WitnessMark:
    """Ledger ``key`` had ``seq`` entries, the last one hashing to ``head``."""

    key: str
    seq: int
    head: str

    def __post_init__(self) -> None:
        problems = []
        if not KEY_ID.fullmatch(self.key):
            problems.append(f"witness key must be an ed25519 key id, got {self.key!r}")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            problems.append(f"witness seq must be an integer >= 1, got {self.seq!r}")
        if not HEX64.fullmatch(self.head):
            problems.append(f"witness head must be 64 hex digits, got {self.head!r}")
        if problems:
            raise PrivacyError(problems)


class Witness:
    """The witness file at ``path`` (created on the first append)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> WitnessMark | None:
        """The recorded mark, or None when there is no witness file yet."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise PrivacyError(f"ledger witness {self.path} cannot be read: {err.strerror or err}") from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PrivacyError(f"ledger witness {self.path} is not a regular file")
            raw = os.read(fd, MAX_WITNESS_BYTES + 1)
        finally:
            os.close(fd)
        try:
            if len(raw) > MAX_WITNESS_BYTES:
                raise ValueError(f"longer than {MAX_WITNESS_BYTES} bytes")
            data: Any = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != WITNESS_FORMAT:
                raise ValueError(f"not a {WITNESS_FORMAT} object")
            return WitnessMark(str(data["key"]), data["seq"], str(data["head"]))
        except (ValueError, KeyError, UnicodeDecodeError, PrivacyError) as err:
            raise PrivacyError(f"ledger witness {self.path} is damaged ({err}); the node will not guess how far its "
                               "ledger went: see docs/ledger.md, 'The witness'") from err

    def check(self, key: str, entries: Sequence[dict[str, Any]], ledger: Path) -> WitnessMark | None:
        """Refuse a ledger that is behind its witness, has diverged from it, or belongs to another key; the mark
        read (None: no witness yet, and an empty ledger)."""
        mark = self.read()
        if mark is None:
            if entries:
                raise PrivacyError(
                    f"ledger {ledger} has {len(entries)} entries but its witness {self.path} does not exist: the "
                    "witness may have been moved or deleted. If this is the first start with a witness, adopt the "
                    "ledger's current head: fedtune-client --adopt-witness with the same --state-dir; see "
                    "docs/ledger.md, 'The witness'")
            return None
        if mark.key != key:
            raise PrivacyError(f"ledger witness {self.path} is for ledger key {mark.key}, but the ledger is signed "
                               f"by {key}: point the node at its own witness")
        if len(entries) < mark.seq:
            raise PrivacyError(
                f"ledger {ledger} ends at line {len(entries)}, but its witness {self.path} shows line {mark.seq} "
                f"(head {mark.head[:16]}...) was written: the ledger was truncated or restored from an older copy. "
                "The privacy loss of the missing entries still counts; restore the newest ledger (the one that "
                f"holds line {mark.seq}); see docs/ledger.md, 'Recovery'")
        if entries[mark.seq - 1].get("hash") != mark.head:
            raise PrivacyError(
                f"ledger {ledger} line {mark.seq} is not the entry its witness {self.path} recorded (head "
                f"{mark.head[:16]}...): the ledger was replaced by another history after that line was written")
        return mark

    def advance(self, mark: WitnessMark) -> None:
        """Record a new head; the witness never moves backwards.

        The new content is fsync'd before it replaces the old. The directory is fsync'd only when the witness is
        new: a crash may then bring back the previous mark, behind a ledger that was fsync'd first — the case
        every session already accepts and catches up with (an append that crashed before its witness update) —
        but never a missing or partial witness.
        """
        current = self.read()
        if current is not None and current.key == mark.key and current.seq > mark.seq:
            raise PrivacyError(f"ledger witness {self.path} is at line {current.seq}; refusing to move it back to "
                               f"line {mark.seq}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": WITNESS_FORMAT, "key": mark.key, "seq": mark.seq, "head": mark.head}
        write_atomically(self.path, json.dumps(payload, sort_keys=True) + "\n", sync_dir=current is None)
