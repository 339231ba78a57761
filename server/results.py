"""The run's results directory: metrics.jsonl (a line per round), metrics.csv, TensorBoard events,
summary.json, adapter/; and :func:`read_rounds`, the one reader of metrics.jsonl.

Lines are appended and fsync'd as rounds finish, so a crashed run keeps every
completed round; metrics.csv is rewritten atomically after each round and
summary.json at the end. TensorBoard event files (``events.out.tfevents.*``) sit
in the results directory itself, so ``tensorboard --logdir results/`` shows one run
per results directory. No file here holds an absolute path of this machine.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.durable import write_atomically
from fedtune.common.errors import ConfigError
from fedtune.common.models.card import CardInfo, NodeStatement
from fedtune.common.privacy.accountant import steps_per_round
from fedtune.common.settings import TrainPlan

if TYPE_CHECKING:
    import datasets

    from fedtune.common.models.adapter import AdapterMeta
    from fedtune.common.settings import PrivacySettings, RunSettings
    from fedtune.common.tasks.result import EvalResult

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
REPORT_FILE = "report.html"
CSV_FIRST = ("round", "accuracy", "loss", "train-loss", "client-accuracy", "epsilon-max", "epsilon-mean")


def read_rounds(results_dir: Path) -> list[dict[str, Any]]:
    """The round lines of ``results_dir/metrics.jsonl``, in file order: every reader of the file uses this.

    A missing or unreadable file has no rounds. A line that is not a JSON object with an integer ``round`` is
    skipped: the recorder appends whole lines and fsyncs each, so such a line is normally the last one, still
    being appended while a reader looks (the progress bar, the watchdog, Prometheus scrapes).
    """
    try:
        text = (results_dir / METRICS_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    rounds = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("round"), int):
            rounds.append(line)
    return rounds


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


def portable(value: Any) -> Any:
    """``value`` with every absolute path string replaced by its last component (recursively)."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def node_name(row: Mapping[str, Any]) -> str:
    """How reports name a node: ``client-<id>`` in simulation (its ledger folder), else the start of its identity
    (the sha256 of its authentication key), else its Flower node id."""
    node = str(row.get("node") or "")
    if node.startswith("simulation:"):
        return node.split(":", 1)[1]
    return f"node-{node.split(':', 1)[1][:12]}" if node else f"node-{row.get('node-id')}"


def eval_fields(result: EvalResult, label_names: list[str]) -> dict[str, Any]:
    """Round-line fields of a held-out evaluation: per-label precision/recall/F1, confusion matrix, groups."""
    from fedtune.common.tasks.classify.evaluation import label_metrics

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 6)

    per_label = {name: {"precision": clean(m.precision), "recall": clean(m.recall), "f1": clean(m.f1),
                        "support": m.support}
                 for name, m in zip(label_names, label_metrics(result.confusion), strict=False)}
    out: dict[str, Any] = {"num-examples": result.num_examples, "labels": label_names,
                           "confusion": result.confusion, "per-label": per_label}
    if result.group_confusion:
        out["groups"] = {g: {"num-examples": sum(map(sum, cm)),
                             "accuracy": round(sum(cm[i][i] for i in range(len(cm))) / max(1, sum(map(sum, cm))), 6),
                             "confusion": cm}
                         for g, cm in result.group_confusion.items()}
    return out


def held_out_groups(dataset: datasets.Dataset, column: str) -> list[str] | None:
    """The group of each held-out example (``report-group-column``), or None when no column is set."""
    if not column:
        return None
    if column not in dataset.column_names:
        raise ConfigError(f"report-group-column '{column}' is not a column of the data; columns are: "
                          f"{', '.join(c for c in dataset.column_names if c != 'text')}")
    return [str(v) for v in dataset[column]]


def card_info(meta: AdapterMeta, settings: RunSettings, rounds: list[dict[str, Any]], status: str) -> CardInfo:
    """The model card's facts, from the run's round lines (the replies the server received)."""
    from fedtune.common.tasks.classify.evaluation import LabelMetrics

    last = next((r for r in reversed(rounds) if r.get("per-label")), rounds[-1] if rounds else {})
    def num(x: Any) -> float:
        return float("nan") if x is None else float(x)

    per_label = [(name, LabelMetrics(num(m.get("precision")), num(m.get("recall")), num(m.get("f1")),
                                     int(m.get("support", 0))))
                 for name, m in (last.get("per-label") or {}).items()]
    return CardInfo(
        meta=meta, settings=settings, nodes=node_statements(rounds, settings.privacy, settings.plan),
        rounds=max((int(r["round"]) for r in rounds), default=0),
        num_clients=len({node_name(row) for r in rounds for row in r.get("clients", [])}),
        held_out_examples=int(last.get("num-examples", 0)), accuracy=last.get("accuracy"), loss=last.get("loss"),
        per_label=per_label, status=status,
        extra={k: last.get(k) for k in ("entity-f1", "entity-precision", "entity-recall", "perplexity") if k in last},
    )


def node_statements(rounds: list[dict[str, Any]], privacy: PrivacySettings,
                    plan: TrainPlan | None = None) -> list[NodeStatement]:
    """Each node's privacy parameters, from the replies it sent (its last reported epsilon wins); the sampling
    rate and steps follow from its reported number of examples and the run's plan."""
    plan = plan or TrainPlan()
    seen: dict[str, dict[str, Any]] = {}
    for line in sorted(rounds, key=lambda r: r["round"]):
        for row in line.get("clients", []):
            if "epsilon" not in row:
                continue
            acc = seen.setdefault(node_name(row), {"steps": 0, "rounds": 0})
            acc["row"] = row
            if row.get("status") == "trained":
                acc["q"], steps = steps_per_round(int(row.get("num-examples", 1)) or 1, plan.batch_size,
                                                  plan.local_epochs)
                acc["steps"] += int(row.get("steps", steps))
                acc["rounds"] += 1
    out = []
    for name, acc in sorted(seen.items()):
        row = acc["row"]
        eps = float(row["epsilon"])
        sigma = row.get("noise-multiplier")
        out.append(NodeStatement(
            node=name, epsilon=eps if math.isfinite(eps) else None,
            delta=float(row.get("delta", privacy.delta)), budget=_float(row.get("epsilon-budget")),
            accountant=str(row.get("accountant", privacy.accountant)),
            clip_norm=float(row.get("clip-norm", privacy.clip_norm)),
            noise_multiplier=float(sigma) if sigma else None, sample_rate=_float(row.get("sample-rate", acc.get("q"))),
            steps=acc["steps"], rounds=acc["rounds"],
            examples=int(row["num-examples"]) if "num-examples" in row else None,
        ))
    return out


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def csv_rows(rounds: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat columns: the scalar fields of each round line, then recall/precision per label."""
    flat = []
    for line in rounds:
        row = {k: v for k, v in line.items() if isinstance(v, int | float | str | type(None))}
        for label, m in (line.get("per-label") or {}).items():
            row[f"recall:{label}"] = m.get("recall")
            row[f"precision:{label}"] = m.get("precision")
        flat.append(row)
    keys = [k for k in CSV_FIRST if any(k in r for r in flat)]
    keys += sorted({k for r in flat for k in r} - set(keys))
    return keys, flat


def write_csv(path: Path, rounds: list[dict[str, Any]]) -> None:
    keys, flat = csv_rows(rounds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    write_atomically(path, buf.getvalue())


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one round line (finite numbers only)."""
    out: dict[str, Any] = {
        "accuracy/held-out": line.get("accuracy"), "loss/held-out": line.get("loss"),
        "loss/train": line.get("train-loss"), "accuracy/clients": line.get("client-accuracy"),
    }
    for label, m in (line.get("per-label") or {}).items():
        out[f"recall/{label}"] = m.get("recall")
        out[f"precision/{label}"] = m.get("precision")
    for row in line.get("clients", []):
        out[f"epsilon/{node_name(row)}"] = row.get("epsilon")
    out |= {f"bytes/{k}": v for k, v in line.items() if k.startswith("bytes")}
    return {k: float(v) for k, v in out.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class RunRecorder:
    """Writes one JSON line per round (and its CSV row and TensorBoard scalars) and the final summary."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = True) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / METRICS_FILE
        self.metrics_path.write_text("")
        self.started = time.monotonic()
        self.rounds: list[dict[str, Any]] = []
        self._tensorboard = tensorboard
        self._writer: Any = None

    def _tb(self) -> Any:
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; heavy import

            self._writer = SummaryWriter(log_dir=str(self.out_dir), flush_secs=5)
        return self._writer

    def resume(self, lines: list[dict[str, Any]]) -> None:
        """Continue an interrupted run: its lines (from the checkpoint) are metrics.jsonl's first ones."""
        self.rounds = list(lines)
        self.metrics_path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def record_round(self, line: dict[str, Any]) -> dict[str, Any]:
        line = {k: _finite_or_none(v) for k, v in line.items()} | {
            "elapsed-s": round(time.monotonic() - self.started, 2)
        }
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rounds.append(line)
        write_csv(self.out_dir / CSV_FILE, self.rounds)
        if writer := self._tb():
            for tag, value in scalars(line).items():
                writer.add_scalar(tag, value, global_step=int(line["round"]))
            writer.flush()
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        self.close()
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
            **portable(extra),
        }
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)
        return summary


def aggregated_updates(rounds: list[dict[str, Any]]) -> int:
    """How many node updates a run aggregated, over all its round lines (0: nothing was learned). A secure round
    whose sum was not aggregated (SecAgg+ did not complete) counts none: its nodes trained, but the global
    adapter did not change."""
    return sum(c.get("status") == "trained" for line in rounds
               if (line.get("secure-aggregation") or {}).get("aggregated", True) is not False
               for c in line.get("clients", []))
