"""The node's app gate: runs only ClientApp bundles (FABs) whose hash the operator allow-listed.

Flower ships the ClientApp from the server; ``--trusted-entities`` only accepts
Flower-Hub signatures. So the node runs ``flower-supernode --isolation process
--superexec-auth-secret-file S`` and this gate takes the place of
``flower-superexec``: it acquires every task from the SuperNode's Runtime API
(authenticated with the shared secret S), compares ``task.fab_hash`` (sha256 of
the FAB, known before anything is installed) with the allow-list, and either

- launches ``flwr-clientapp`` for the task (allowed): it hands the task's token to a ClientApp process it started
  ahead of time (:mod:`fedtune.client.prewarmed`, imports done; one process per task, as Flower's own), or starts
  ``flwr-clientapp`` when none is ready; or
- refuses it: pulls the task input with the task's token, pushes an error reply
  (``ErrorCode.INVALID_FAB`` with the reason) and marks the task FAILED. The
  server sees the error reply; the node stays healthy; no app code ever ran
  (the SuperNode reads only the FAB's pyproject; code first runs in flwr-clientapp).

Every decision is appended to a JSON-lines file for the node's own audit trail.
This uses Flower internals (Runtime HTTP client, clientapp helpers): flwr is
pinned and an integration test covers both paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.flower.processes import flower_bin

log = logging.getLogger("fedtune.gate")
HASH = re.compile(r"^[0-9a-f]{64}$")
POLL_S = 0.5
ACQUIRE_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def read_allowlist(path: Path) -> frozenset[str]:
    """sha256 hex digests, one a line; ``#`` starts a comment. Every bad line is reported."""
    if not path.is_file():
        raise ConfigError(f"app allow-list {path} does not exist")
    hashes, problems = set(), []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if HASH.match(line):
            hashes.add(line)
        else:
            problems.append(f"{path} line {lineno}: expected a sha256 hex digest (64 hex characters), got {line!r}")
    if problems:
        raise ConfigError(problems)
    if not hashes:
        log.warning("app allow-list %s is empty: every run will be refused", path)
    return frozenset(hashes)


@dataclass(frozen=True)
class GateConfig:
    """Where the SuperNode's Runtime API is and what may run."""

    runtime_address: str  # host:port of the SuperNode's Runtime API (node-local)
    secret: bytes  # the SuperExec shared secret (same file as the SuperNode's)
    allowlist: Path  # re-read on every task, so an operator can edit it without a restart
    decisions: Path  # JSON lines: one per task (allowed / refused)
    prewarm: bool = True  # keep the next task's ClientApp process started, its imports done (client.prewarmed)


class Gate:
    """Acquires tasks and launches or refuses each one."""

    def __init__(self, cfg: GateConfig) -> None:
        self.cfg = cfg
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.spare = self._start_spare()
        self.client = RuntimeHttpClient.from_server_address(
            server_address=cfg.runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=cfg.secret, protected_methods=ACQUIRE_METHODS)],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self) -> None:
        while not self.stopping:
            self.children = [c for c in self.children if c.poll() is None]
            try:
                res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[t.value for t in TaskType]))
            except httpx.HTTPError as err:
                log.warning("runtime API at %s not reachable (%s); retrying", self.cfg.runtime_address, err)
                time.sleep(2.0)
                continue
            if res.HasField("task") and res.token:
                self.handle(res.task, res.token)
            time.sleep(POLL_S)

    def handle(self, task: Task, token: str) -> None:
        fab_hash = task.fab_hash if task.HasField("fab_hash") else ""
        try:
            allowed = read_allowlist(self.cfg.allowlist)
        except ConfigError as err:
            self.refuse(task, token, f"the node's app allow-list is unusable: {err}")
            return
        if task.type != TaskType.CLIENT_APP.value:
            self.refuse(task, token, f"this node only runs ClientApps, not tasks of type {task.type!r}")
        elif fab_hash not in allowed:
            self.refuse(task, token, f"app bundle sha256 {fab_hash or '(none)'} is not on this node's allow-list "
                                     f"({self.cfg.allowlist})")
        else:
            self.launch(task, token)

    def launch(self, task: Task, token: str) -> None:
        kind = TaskType(task.type)
        spare, self.spare = self.spare, None
        if spare is not None and spare.poll() is None and spare.stdin is not None:
            try:
                spare.stdin.write(f"{token}\n".encode())
                spare.stdin.close()
                self.children.append(spare)
                how = "handed it to the waiting ClientApp process"
            except OSError:  # it died just now: start one the usual way
                spare = None
        else:
            spare = None
        if spare is None:
            cmd = [TASK_TYPE_TO_COMMAND[kind], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[kind], self.cfg.runtime_address,
                   "--token", token, "--insecure"]
            self.children.append(subprocess.Popen([flower_bin(cmd[0]), *cmd[1:]]))
            how = f"started {cmd[0]}"
        self._record(task, "allowed", "")
        log.info("run %s: app %s is allow-listed; %s", task.run_id, task.fab_hash[:12], how)
        self.spare = self._start_spare()

    def _start_spare(self) -> subprocess.Popen[bytes] | None:
        """The next task's ClientApp process, importing while the node waits (None when prewarm is off)."""
        if not self.cfg.prewarm:
            return None
        return subprocess.Popen([sys.executable, "-m", "fedtune.client.prewarmed", "--runtime-api-address",
                                 self.cfg.runtime_address, "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE)

    def refuse(self, task: Task, token: str, reason: str) -> None:
        """Answer the task with an error reply and a FAILED status, without running any of its code."""
        self._record(task, "refused", reason)
        log.warning("run %s: refused: %s", task.run_id, reason)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.cfg.runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        context = None
        try:
            message, context, _run, _fab = pull_task_input(client)
            push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
        except (httpx.HTTPError, RuntimeError, ValueError) as err:
            log.error("run %s: could not send the refusal reply: %s", task.run_id, err)
        finally:
            push_task_output(client, context, SubStatus.FAILED, reason)
            client.close()

    def _record(self, task: Task, decision: str, reason: str) -> None:
        entry = {"time": time.time(), "run-id": task.run_id, "task-id": task.task_id, "task-type": task.type,
                 "fab-hash": task.fab_hash, "decision": decision, "reason": reason}
        self.cfg.decisions.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cfg.decisions, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for child in [*self.children, *([self.spare] if self.spare is not None else [])]:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtune-gate", description="Allow-list gate for ClientApp bundles "
                                "(started by fedtune-client; runs next to flower-supernode --isolation process).")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--secret-file", type=Path, required=True, help="SuperExec shared secret file")
    p.add_argument("--allowlist", type=Path, required=True, help="file of allowed FAB sha256 digests")
    p.add_argument("--decisions", type=Path, required=True, help="JSON-lines record of every decision")
    p.add_argument("--no-prewarm", action="store_true", help="start each ClientApp process only when its task "
                   "arrives (default: one waits with its imports done)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        read_allowlist(args.allowlist)
        cfg = GateConfig(args.runtime_api_address, args.secret_file.read_bytes(), args.allowlist, args.decisions,
                         prewarm=not args.no_prewarm)
    except (FedtuneError, OSError) as err:
        print(f"fedtune-gate: {err}", file=sys.stderr)
        return 2
    gate = Gate(cfg)
    signal.signal(signal.SIGTERM, gate.stop)
    signal.signal(signal.SIGINT, gate.stop)
    gate.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
