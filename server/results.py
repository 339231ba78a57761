"""The run's results directory: metrics.jsonl (a line per round), summary.json, adapter/.

Lines are appended and fsync'd as rounds finish, so a crashed run keeps every
completed round; summary.json is written atomically at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fedtune.common.durable import write_atomically

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


class RunRecorder:
    """Writes one JSON line per round and the final summary."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / METRICS_FILE
        self.metrics_path.write_text("")
        self.started = time.monotonic()
        self.rounds: list[dict[str, Any]] = []

    def record_round(self, line: dict[str, Any]) -> dict[str, Any]:
        line = {k: _finite_or_none(v) for k, v in line.items()} | {
            "elapsed-s": round(time.monotonic() - self.started, 2)
        }
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rounds.append(line)
        return line

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else {}
        first = self.rounds[0] if self.rounds else {}
        summary = {
            "rounds": len(self.rounds) - 1 if self.rounds else 0,
            "initial-accuracy": first.get("accuracy"),
            "final-accuracy": last.get("accuracy"),
            "final-loss": last.get("loss"),
            "epsilon-max": max((r["epsilon-max"] for r in self.rounds if r.get("epsilon-max") is not None),
                               default=None),
            "elapsed-s": round(time.monotonic() - self.started, 2),
            **extra,
        }
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)
        return summary
