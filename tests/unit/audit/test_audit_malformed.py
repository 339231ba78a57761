"""Malformed ledgers: every one gives exit 1 with the line and the field, never a traceback.

The base ledger is a real signed one (header on line 1, one charged round on line 2); each
case breaks it the way a careless edit, a disk error or an attacker would.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtune.audit.cli import main
from fedtune.common.ledger.chain import canonical
from fedtune.common.ledger.reader import MAX_LEDGER_BYTES, MAX_LINE_BYTES, MAX_LINES
from tests.unit.audit.ledgers import NODE_A, Node, charge, make_node

Lines = list[bytes]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Node:
    node = make_node(tmp_path_factory.mktemp("node"))
    charge(node, 1)
    return node


def _text(old: str, new: str, line: int = 2) -> Callable[[Lines], Lines]:
    """Replace JSON text on one line (values no JSON library would write)."""
    def edit(lines: Lines) -> Lines:
        assert old.encode() in lines[line - 1], old
        return [raw.replace(old.encode(), new.encode(), 1) if i == line - 1 else raw for i, raw in enumerate(lines)]
    return edit


def _value(path: str, value: object, line: int = 2) -> Callable[[Lines], Lines]:
    """Set a (nested, dotted) field to ``value`` and rewrite the line canonically (unsigned)."""
    def edit(lines: Lines) -> Lines:
        entry = json.loads(lines[line - 1])
        *parents, leaf = path.split(".")
        target = entry
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
        return [canonical(entry) if i == line - 1 else raw for i, raw in enumerate(lines)]
    return edit


def _raw(line_2: bytes) -> Callable[[Lines], Lines]:
    return lambda lines: [lines[0], line_2, *lines[2:]]


_DELETE = object()

# (case, edit of the lines, expected "line N: ..." fragment, expected field or reason)
CASES: list[tuple[str, Callable[[Lines], Lines], str, str]] = [
    ("NaN", _text('"epsilon":', '"epsilon":NaN,"x":'), "line 2:", "field 'epsilon': NaN"),
    ("Infinity", _text('"epsilon_round":', '"epsilon_round":Infinity,"y":'), "line 2:", "field 'epsilon_round'"),
    ("-Infinity", _text('"budget":8.0', '"budget":-Infinity'), "line 2:", "field 'budget': -Infinity"),
    ("1e999", _text('"delta":1e-05', '"delta":1e999'), "line 2:", "field 'delta': 1e999"),
    ("huge int", _text('"seq":2', '"seq":' + "9" * 40), "line 2:", "field 'seq'"),
    ("huge nested int", _text('"steps":4', '"steps":' + "1" * 5000), "line 2:", "field 'event.steps'"),
    ("string for number", _value("epsilon", "5.05"), "line 2:", "field 'epsilon' must be a number, got str"),
    ("bool for number", _value("budget", True), "line 2:", "field 'budget' must be a number, got true/false"),
    ("bool for int", _value("event.steps", True), "line 2:", "field 'event.steps' must be an integer"),
    ("float for int", _value("event.steps", 4.5), "line 2:", "field 'event.steps' must be an integer"),
    ("null for int", _value("seq", None), "line 2:", "field 'seq' must be an integer, got null"),
    ("missing field", _value("delta", _DELETE), "line 2:", "missing field 'delta'"),
    ("missing nested field", _value("event.sample_rate", _DELETE), "line 2:", "missing field 'event.sample_rate'"),
    ("unknown field", _value("extra", 1), "line 2:", "unknown field 'extra'"),
    ("list for object", _value("accountant", []), "line 2:", "field 'accountant' must be an object, got list"),
    ("negative epsilon", _value("epsilon", -1.0), "line 2:", "field 'epsilon' must be in [0"),
    ("sample rate above 1", _value("event.sample_rate", 1.5), "line 2:", "field 'event.sample_rate' must be in"),
    ("delta 0", _value("delta", 0.0), "line 2:", "field 'delta' must be in (0, 1)"),
    ("unknown kind", _value("kind", "banana"), "line 2:", "field 'kind' must be one of"),
    ("list for kind", _value("kind", []), "line 2:", "field 'kind' must be one of header, policy, round, repair, "
                                                     "got '[]'"),
    ("number for signature", _value("sig", 12), "line 2:", "field 'sig' must be the base64"),
    ("unknown rng", _value("rng", "mt19937"), "line 2:", "field 'rng' must be 'secrets'"),
    ("released not a list", _value("released", "train-loss"), "line 2:", "field 'released' must be a list"),
    ("overlong time", _value("time", "x" * 5000), "line 2:", "field 'time' is 5000 characters long"),
    ("format 1", _value("format", "fedtune-ledger/1"), "line 2:", "format fedtune-ledger/1 is no longer accepted"),
    ("non-ASCII UTF-8", _text('"decision":"charged"', '"decision":"ch\xffrged"'), "line 2:", "byte 0xc3 at column"),
    ("non-UTF-8 byte", lambda lines: [lines[0], lines[1].replace(b"charged", b"ch\xe4rged")], "line 2:",
     "byte 0xe4 at column"),
    ("CRLF", lambda lines: [lines[0], lines[1] + b"\r"], "line 2:", "byte 0x0d at column"),
    ("not JSON", _raw(b"{not json"), "line 2:", "not valid JSON"),
    ("array", _raw(b"[1,2,3]"), "line 2:", "not a JSON object (got list)"),
    ("duplicate field", _raw(b'{"epsilon":1.0,"epsilon":0.5}'), "line 2:", "field 'epsilon' appears twice"),
    ("deep nesting", _raw(b"[" * 30000 + b"]" * 30000), "line 2:", "nested too deeply"),
    ("empty line", lambda lines: [lines[0], b"", lines[1]], "line 2:", "empty line"),
    ("long line", _raw(b'{"pad":"' + b"x" * (2 * MAX_LINE_BYTES) + b'"}'), "line 2:",
     f"longer than {MAX_LINE_BYTES} bytes"),
    ("binary", lambda lines: [bytes(range(256)) * 3], "line 1:", "byte 0x00 at column 1"),
]


def _audit(path: Path, node: Node, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(path), "-k", str(node.public_key), "--node", NODE_A])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize(("case", "edit", "where", "what"), CASES, ids=[c[0] for c in CASES])
def test_malformed_ledger_fails_naming_line_and_field(base: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      case: str, edit: Callable[[Lines], Lines], where: str,
                                                      what: str) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for raw in edit(base.ledger_path.read_bytes().splitlines())))
    code, text = _audit(path, base, capsys)
    assert code == 1, f"{case}: exit {code}\n{text}"
    assert "Traceback" not in text
    assert any(where in row and what in row for row in text.splitlines()), text


def test_file_level_problems(base: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty file, a symlink, a 1 GB file (one line, never read), a directory entry that is no file."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    link = tmp_path / "link.jsonl"
    link.symlink_to(base.ledger_path)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as fh:  # sparse: 1 GiB of zero bytes, no newline, no disk used
        fh.truncate(1024**3)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    many = tmp_path / "many.jsonl"
    many.write_bytes(b"{}\n" * (MAX_LINES + 5))
    for path, message in ((empty, "file: the ledger is empty"), (link, "file: is a symbolic link"),
                          (many, f"file: more than {MAX_LINES} lines: lines after {MAX_LINES} are not read"),
                          (huge, f"file: {1024**3} bytes; a ledger is at most {MAX_LEDGER_BYTES} bytes"),
                          (fifo, "file: not a regular file")):
        code, text = _audit(path, base, capsys)
        assert code == 1 and message in text and "Traceback" not in text, text


def test_output_is_bounded(base: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.jsonl"
    shutil.copy(base.ledger_path, path)
    with open(path, "ab") as fh:
        fh.write(b"garbage\n" * 500)
    code, text = _audit(path, base, capsys)
    assert code == 1
    listed = [row for row in text.splitlines() if "not valid JSON" in row]
    assert len(listed) == 20 and "... and 480 more" in text
    main([str(path), "-k", str(base.public_key), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert len(report["ledgers"][0]["problems"]) == 20 and report["ledgers"][0]["problems_not_listed"] == 480
