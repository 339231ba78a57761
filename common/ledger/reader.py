"""Bounded reading of a ledger file: every reader of a ledger (node, auditor, metrics) goes through here.

A file above :data:`MAX_LEDGER_BYTES` is refused unread; symbolic links, FIFOs and other non-regular
files are refused; a line above :data:`MAX_LINE_BYTES` is reported and skipped without being held in
memory; lines past :data:`MAX_LINES` are not read. Together these bound the memory any file can take.

Lines are parsed strictly by default (:func:`parse_line`: printable ASCII, one canonical JSON object,
no duplicate field, numbers kept as :class:`~fedtune.common.ledger.schema.BadNumber` when Python could
not hold them faithfully); a reader that only shows what it can (the node's metrics) passes its own
line parser, under the same limits. A torn last line (no newline) is always reported.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common.ledger.chain import Problem, canonical
from fedtune.common.ledger.schema import DuplicateField, Entry, bad_numbers, loads

MAX_LINE_BYTES = 64 * 1024  # an entry is ~1.3 KB; anything this long is not one
MAX_LEDGER_BYTES = 32 * 1024 * 1024  # ~25,000 rounds; larger files are refused unread
MAX_LINES = 100_000  # lines read at most (with the byte limit, this bounds the memory a ledger can take)
CHUNK = 1024 * 1024

# One complete line (without its newline) -> the entry on it, what is wrong with it, or None to skip it.
LineParser = Callable[[bytes], str | Entry | None]


@dataclass
class ParsedLedger:
    path: Path
    entries: list[tuple[int, Entry]] = field(default_factory=list)  # (line number, entry) of lines that parsed
    problems: list[Problem] = field(default_factory=list)
    complete_bytes: int = 0  # bytes up to and including the last newline
    torn_bytes: int = 0  # bytes after the last newline (an interrupted append)


def parse_line(raw: bytes) -> str | Entry:
    """The entry on one complete line, or what is wrong with the line."""
    if not raw:
        return "empty line"
    bad = next((i for i, b in enumerate(raw) if b < 0x20 or b > 0x7E), None)
    if bad is not None:
        return (f"byte 0x{raw[bad]:02x} at column {bad + 1}: a ledger line is printable ASCII "
                "(binary data, or an edit that is not UTF-8 canonical JSON)")
    try:
        entry = loads(raw)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    except DuplicateField as err:
        return f"field '{str(err)[:64]}' appears twice"
    except RecursionError:
        return "nested too deeply to be a ledger entry"
    if not isinstance(entry, dict):
        return f"not a JSON object (got {type(entry).__name__})"
    if not bad_numbers(entry) and raw != canonical(entry):
        return "not in canonical JSON form (the line was re-written or edited)"
    return entry


def parse_chunks(chunks: Iterable[bytes], path: Path, line_parser: LineParser = parse_line) -> ParsedLedger:
    """Split a byte stream into entries without ever holding more than one line of at most MAX_LINE_BYTES."""
    parsed = ParsedLedger(path)
    buf, overlong, number, seen = bytearray(), 0, 1, 0

    def finish(raw: bytes) -> None:
        result = line_parser(raw)
        if isinstance(result, str):
            parsed.problems.append(Problem(number, result))
        elif result is not None:
            parsed.entries.append((number, result))

    for chunk in chunks:
        start = 0
        while number <= MAX_LINES:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            seen += len(piece) + (newline >= 0)
            if overlong or len(buf) + len(piece) > MAX_LINE_BYTES:
                overlong, buf = overlong + len(buf) + len(piece), bytearray()
            else:
                buf += piece
            if newline < 0:
                break
            if overlong:
                parsed.problems.append(Problem(number, f"longer than {MAX_LINE_BYTES} bytes ({overlong} bytes); "
                                                       "not a ledger entry, not read"))
            else:
                finish(bytes(buf))
            number, buf, overlong, start = number + 1, bytearray(), 0, newline + 1
            parsed.complete_bytes = seen
        if number > MAX_LINES:
            parsed.problems.append(Problem(0, f"more than {MAX_LINES} lines: lines after {MAX_LINES} are not read"))
            return parsed
    parsed.torn_bytes = overlong or len(buf)
    if parsed.torn_bytes:
        parsed.problems.append(Problem(number, f"torn last line: {parsed.torn_bytes} bytes without a newline "
                                               "(an append was interrupted, or the file was truncated)"))
    return parsed


def fd_chunks(fd: int, size: int) -> Iterator[bytes]:
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def file_problem(fd: int, path: Path) -> str | None:
    """Why the open file ``fd`` is not read at all (not a regular file, above the size limit), or None."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_LEDGER_BYTES:
        return f"{info.st_size} bytes; a ledger is at most {MAX_LEDGER_BYTES} bytes, so this is not read"
    return None


def read(path: Path, line_parser: LineParser = parse_line) -> ParsedLedger:
    """Parse a ledger file; every problem (a symlink, a binary file, a bad line) is reported, none raised."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        reason = "is a symbolic link; give the ledger file itself" if path.is_symlink() else \
            f"cannot be read: {err.strerror or err}"
        return ParsedLedger(path, problems=[Problem(0, reason)])
    try:
        if (problem := file_problem(fd, path)) is not None:
            return ParsedLedger(path, problems=[Problem(0, problem)])
        parsed = parse_chunks(fd_chunks(fd, os.fstat(fd).st_size), path, line_parser)
    finally:
        os.close(fd)
    if not parsed.entries and not parsed.problems:
        parsed.problems.append(Problem(0, "the ledger is empty"))
    return parsed
