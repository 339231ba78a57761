"""Every reader of a ledger goes through the bounded reader: the node's metrics endpoint included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from fedtune.client import monitoring
from fedtune.client.node_check import NodeOptions
from fedtune.common.ledger import reader
from fedtune.common.ledger.reader import MAX_LEDGER_BYTES, MAX_LINE_BYTES, read
from tests.unit.audit.ledgers import charge, make_node


def _opts(state: Path) -> NodeOptions:
    return NodeOptions(superlink="127.0.0.1:1", data=state, state_dir=state)


def _metrics(state: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(monitoring.NodeCollector(_opts(state)))
    lines = [x for x in generate_latest(registry).decode().splitlines() if x.startswith("fedtune_node_ledger")]
    return {x.split()[0]: float(x.split()[1]) for x in lines}


def test_the_metrics_reader_refuses_an_oversized_ledger_unread_like_read(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(MAX_LEDGER_BYTES + 1)  # sparse: 32 MiB of NUL bytes on disk for nothing
    expected = read(path).problems
    assert [str(p) for p in expected] == [f"file: {MAX_LEDGER_BYTES + 1} bytes; a ledger is at most "
                                          f"{MAX_LEDGER_BYTES} bytes, so this is not read"]

    def never(*_args: object) -> None:
        raise AssertionError("an oversized ledger was read")

    monkeypatch.setattr(reader, "fd_chunks", never)
    reading = monitoring.read_ledger(_opts(tmp_path))
    assert reading.file_problems == expected and reading.rounds == [] and reading.unparsable == 0
    assert _metrics(tmp_path) == {"fedtune_node_ledger_entries": 0.0, "fedtune_node_ledger_unparsable_lines": 0.0}


def test_the_metrics_reader_refuses_links_and_fifos(tmp_path: Path) -> None:
    node = make_node(tmp_path / "n")
    charge(node, 1)
    link = tmp_path / "link"
    link.mkdir()
    (link / "ledger.jsonl").symlink_to(node.ledger_path)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "ledger.jsonl")  # read_bytes() would block the scrape forever
    for state, message in ((link, "is a symbolic link"), (fifo, "not a regular file")):
        reading = monitoring.read_ledger(_opts(state))
        assert reading.rounds == [] and [p.message for p in reading.file_problems] == [
            p.message for p in read(state / "ledger.jsonl").problems] and message in reading.file_problems[0].message


def test_the_metrics_reader_skips_overlong_and_binary_lines_and_counts_them(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    charge(node, 1)
    charge(node, 2)
    with open(node.ledger_path, "ab") as fh:
        fh.write(b'{"decision":"charged","pad":"' + b"x" * MAX_LINE_BYTES + b'"}\n')  # JSON, but overlong
        fh.write(bytes(range(11, 256)) + b"\n")  # binary (no newline inside)
        fh.write(b'{"decision":"refused", "dataset":"ward-7-notes", "epsilon":"x"}\n')  # tolerated: not canonical
        fh.write(b'{"torn":')
    reading = monitoring.read_ledger(_opts(node.state))
    assert [r.charged for r in reading.rounds] == [True, True, False]
    assert reading.rounds[-1].epsilon is None and reading.unparsable == 3 and reading.file_problems == []
    assert reading.rounds[0] == monitoring.LedgerRound(
        "ward-7-notes", True, json.loads(node.ledger_path.read_bytes().splitlines()[1])["epsilon"], 8.0, "",
        reading.rounds[0].time)
