"""The app gate's decisions, without a SuperNode: launch only allow-listed ClientApp bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.proto.task_pb2 import Task

from fedtune.client.gate import Gate, GateConfig

ALLOWED, OTHER = "ab" * 32, "cd" * 32


class RecordingGate(Gate):
    """The real decision logic; launching and refusing are recorded instead of talking to Flower."""

    def __init__(self, cfg: GateConfig) -> None:  # no Runtime API client
        self.cfg = cfg
        self.children = []
        self.stopping = False
        self.spare = None
        self.calls: list[tuple[str, int, str]] = []

    def launch(self, task: Task, token: str) -> None:
        self._record(task, "allowed", "")
        self.calls.append(("launch", task.run_id, ""))

    def refuse(self, task: Task, token: str, reason: str) -> None:
        self._record(task, "refused", reason)
        self.calls.append(("refuse", task.run_id, reason))


@pytest.fixture()
def gate(tmp_path: Path) -> RecordingGate:
    allow = tmp_path / "allowed.txt"
    allow.write_text(f"{ALLOWED}\n")
    return RecordingGate(GateConfig("127.0.0.1:1", b"secret", allow, tmp_path / "decisions.jsonl"))


@pytest.mark.parametrize(("task", "expected"), [
    (Task(task_id=1, run_id=7, type="flwr-clientapp", fab_hash=ALLOWED), "launch"),
    (Task(task_id=2, run_id=8, type="flwr-clientapp", fab_hash=OTHER), "refuse"),
    (Task(task_id=3, run_id=9, type="flwr-clientapp"), "refuse"),
    (Task(task_id=4, run_id=10, type="flwr-serverapp", fab_hash=ALLOWED), "refuse"),
])
def test_only_allow_listed_clientapps_are_launched(gate: RecordingGate, task: Task, expected: str) -> None:
    gate.handle(task, "token")
    assert [c[0] for c in gate.calls] == [expected]
    (decision,) = [json.loads(line) for line in gate.cfg.decisions.read_text().splitlines()]
    assert decision["run-id"] == task.run_id and decision["decision"] == ("allowed" if expected == "launch"
                                                                           else "refused")


def test_allow_list_is_reread_for_every_task(gate: RecordingGate) -> None:
    task = Task(task_id=1, run_id=7, type="flwr-clientapp", fab_hash=OTHER)
    gate.handle(task, "t")
    gate.cfg.allowlist.write_text(f"{ALLOWED}\n{OTHER}\n")
    gate.handle(task, "t")
    assert [c[0] for c in gate.calls] == ["refuse", "launch"]


def test_a_broken_allow_list_refuses_everything(gate: RecordingGate) -> None:
    gate.cfg.allowlist.write_text("not a hash\n")
    gate.handle(Task(task_id=1, run_id=7, type="flwr-clientapp", fab_hash=ALLOWED), "t")
    assert gate.calls[0][0] == "refuse" and "allow-list is unusable" in gate.calls[0][2]


class SpareGate(Gate):
    """The real launch: each task's token goes to the process waiting for it, and the next one starts at once."""

    def __init__(self, cfg: GateConfig, out: Path) -> None:  # no Runtime API client
        self.cfg, self.out, self.children, self.stopping, self.started = cfg, out, [], False, 0
        self.spare = self._start_spare()

    def _start_spare(self):
        import subprocess
        import sys

        self.started += 1
        script = f"import sys; open({str(self.out / str(self.started))!r}, 'w').write(sys.stdin.readline())"
        return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)

    def refuse(self, task: Task, token: str, reason: str) -> None:
        self._record(task, "refused", reason)


def test_a_task_goes_to_the_waiting_clientapp_process_and_the_next_one_starts(tmp_path: Path) -> None:
    allow = tmp_path / "allowed.txt"
    allow.write_text(f"{ALLOWED}\n")
    gate = SpareGate(GateConfig("127.0.0.1:1", b"secret", allow, tmp_path / "decisions.jsonl"), tmp_path)
    first = gate.spare
    gate.handle(Task(task_id=1, run_id=7, type="flwr-clientapp", fab_hash=ALLOWED), "token-1")
    assert gate.children == [first] and first.wait(timeout=30) == 0
    assert (tmp_path / "1").read_text() == "token-1\n"  # one process per task: the first got the first token
    second = gate.spare
    assert second is not None and second is not first and gate.started == 2
    gate.handle(Task(task_id=2, run_id=7, type="flwr-clientapp", fab_hash=OTHER), "token-2")  # refused: not used
    assert gate.spare is second and second.poll() is None
    gate.stop(15, None)
    second.wait(timeout=30)
