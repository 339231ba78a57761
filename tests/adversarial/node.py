"""A real node (the ClientApp, called in-process as Flower's runtime would) that a test plays the curious server
against: two copies of it whose datasets differ in one row, requests the test crafts, replies compared field by
field."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client import app as client_app
from fedtune.client.policy import NodePolicy, policy_toml
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import load_base
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.wire.arrays import Arrays, arrays_to_record
from fedtune.common.wire.contract import RoundRequest
from tests.tiny import make_sentiment_frame

LABELS = ("neg", "pos")
TARGET = "the target patient story plot"  # the row a curious server wants to know about
# Fields of a reply that differ between any two nodes whatever their data: the ledger's key and the (random,
# salted) hash of the entry, and the node's signature over them.
RECEIPT_FIELDS = frozenset({"status.ledger-key", "status.ledger-head", "status.node-sig"})


@dataclass(frozen=True)
class Node:
    """One node's configuration, as Flower hands it to the ClientApp."""

    config: dict[str, str]
    state: Path

    def ledger(self) -> list[dict[str, Any]]:
        path = self.state / "ledger.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def neighbours(n: int = 40, *, target_label: str = "pos", seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two datasets that differ in one row: ``with_target`` holds TARGET (labelled ``target_label``) where
    ``without`` holds an ordinary row."""
    without = make_sentiment_frame(n, seed=seed)
    with_target = without.copy()
    with_target.loc[0, "text"], with_target.loc[0, "label"] = TARGET, target_label
    return with_target, without


def make_node(root: Path, frame: pd.DataFrame, policy: NodePolicy, *, labels: tuple[str, ...] = LABELS,
              task: str = "classify") -> Node:
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "data.csv", index=False)
    (root / "policy.toml").write_text(policy_toml(policy))
    config = {"data-path": str(root / "data.csv"), "state-dir": str(root / "state"),
              "policy": str(root / "policy.toml"), "task": task, "labels": json.dumps(list(labels))}
    return Node(config, root / "state")


def request(model_dir: Path, **changes: Any) -> RoundRequest:
    """A plausible request; ``changes`` replace its fields (``labels``, ``model``, ``privacy``, ...)."""
    settings = RunSettings.from_config({"model-path": str(model_dir), "max-seq-len": 12, "batch-size": 16,
                                        "num-rounds": 2, "epsilon": 4.0})
    base = RoundRequest(1, "run-k", 0, LABELS, settings.model, settings.lora, settings.plan, settings.privacy)
    return dataclasses.replace(base, **changes)


def adapter(model_dir: Path, req: RoundRequest, *, labels: int = 2) -> Arrays:
    """The adapter tensors a model for ``req`` starts from (the server's usual message)."""
    return to_arrays(build_model(load_base(str(model_dir)), labels, req.lora, torch.device("cpu")))


def ner_adapter(model_dir: Path, req: RoundRequest) -> Arrays:
    """The adapter tensors of a token classifier for ``req`` (its labels are the tags)."""
    from fedtune.common.tasks import get_task

    task = get_task("ner")
    return to_arrays(task.build_model(task.load_base(str(model_dir)), req.labels, req.lora, torch.device("cpu")))


def send(node: Node, req: RoundRequest | Mapping[str, Any], arrays: Arrays, *, run_id: int = 1) -> Message:
    """One training message to the node's real ClientApp; its reply."""
    record = req.to_record() if isinstance(req, RoundRequest) else ConfigRecord(dict(req))
    content = RecordDict({"arrays": arrays_to_record(arrays), "request": record})
    msg = Message(content, dst_node_id=7, message_type="train")
    return client_app.train(msg, Context(run_id=run_id, node_id=7, node_config=node.config, state=RecordDict(),
                                         run_config={}))


def fields(reply: Message) -> dict[str, Any]:
    """Every value the reply carries, by ``record.key`` (arrays as ``arrays.*``: their values are the update)."""
    c = reply.content
    out: dict[str, Any] = {f"{name}.{key}": value for records in (c.config_records, c.metric_records)
                           for name, rec in records.items() for key, value in rec.items()}
    return out | {f"{name}.*": None for name in c.array_records}


def public(reply: Message) -> dict[str, Any]:
    """The reply without the receipt fields that differ between any two nodes."""
    return {k: v for k, v in fields(reply).items() if k not in RECEIPT_FIELDS}


def with_values(arrays: Arrays, name_part: str, value: float) -> Arrays:
    """``arrays`` with every tensor whose name contains ``name_part`` set to ``value`` (float64, as a server may
    send it)."""
    return {k: (np.full(v.shape, value, dtype=np.float64) if name_part in k else v) for k, v in arrays.items()}
