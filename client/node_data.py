"""A node's own examples: read from its data file, checked, split and tokenised, cached per process.

Everything here is decided by the node: the file, its columns and its label set come from the node's
configuration, the local test split (only when the policy releases local evaluation) from a seed the node
draws once with ``secrets`` and keeps in its state directory. The only server input is the order of the
class names, after the round has checked that they are exactly the node's declared labels. A row that
fails a check (empty text, a label outside the declaration, a malformed line) is left out and named in
the node's own log: what the node replies never depends on one row. ``fedtune-client`` reports such rows
at start-up (``client/node_check.py``), ``fedtune-sim`` before the run starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch

from fedtune.client.node_config import NodeConfig
from fedtune.common.data.table import LabelledData, fresh_fingerprint, holdout_split
from fedtune.common.errors import DataError
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks import get_task

log = logging.getLogger("fedtune.client")
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [N, T], mask [N, T], labels [N] or [N, T]

LOCAL_TEST_FRACTION = 0.1
SPLIT_SEED_FILE = "local-split.seed"
# What a process keeps of its nodes' rows, tokens and cached frozen-layer states (least recently used first out):
# a simulation's process runs every node's rounds, so this holds thousands of small nodes, or a few big ones.
CACHE_BYTES = 1 << 30
ENTRY_OVERHEAD_BYTES = 64 * 1024  # the objects around a node's tables and tensors (measured: ~38 KB RSS for 6 rows)


@dataclass(frozen=True)
class NodeRows:
    """The node's validated examples (labels as indices into the run's class names)."""

    train: LabelledData
    test: LabelledData  # empty unless the policy releases local evaluation
    fingerprint: str  # sha256 over the training examples; stays on the node (ledger)
    task: str
    _tensors: dict[tuple[str, str, int], Tensors] = field(default_factory=dict, compare=False, repr=False)
    _inputs: dict[tuple[str, int, tuple[int, ...]], dict[str, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def num_train(self) -> int:
        return len(self.train.dataset)

    def nbytes(self) -> int:
        """What the node's rows take in memory: tables, token tensors, cached inputs, and a fixed overhead."""
        tables = sum(part.dataset.data.nbytes for part in (self.train, self.test))
        tensors = sum(t.element_size() * t.nelement() for group in self._tensors.values() for t in group)
        inputs = sum(t.element_size() * t.nelement() for group in self._inputs.values() for t in group.values())
        return ENTRY_OVERHEAD_BYTES + tables + tensors + inputs


RowsKey = tuple[str, tuple[int, ...], str, str, tuple[str, ...], int | None, str]


class RowsCache:
    """Nodes' rows by data file (path and stat: any change of the file is a new key), least recently used first
    out, bounded by the bytes they hold (:meth:`NodeRows.nbytes`, counted again as tokens are added)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[RowsKey, tuple[NodeRows, int]] = OrderedDict()
        self._keys: dict[int, RowsKey] = {}  # id(rows) -> its key, to recount a node whose tensors grew
        self.total = 0

    def get(self, key: RowsKey) -> NodeRows | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: RowsKey, rows: NodeRows) -> None:
        self._drop(key)
        self._items[key] = (rows, 0)
        self._keys[id(rows)] = key
        self.recount(rows)

    def recount(self, rows: NodeRows) -> None:
        """Count ``rows`` again (its tensors grew), then drop the least recently used nodes beyond the bound."""
        key = self._keys.get(id(rows))
        if key is None or key not in self._items:
            return
        size = rows.nbytes()
        self.total += size - self._items[key][1]
        self._items[key] = (rows, size)
        while self.total > self.max_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)))

    def _drop(self, key: RowsKey) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.total -= item[1]
            self._keys.pop(id(item[0]), None)

    def clear(self) -> None:
        self._items.clear()
        self._keys.clear()
        self.total = 0


ROWS = RowsCache(CACHE_BYTES)


def split_seed(state_dir: Path) -> int:
    """The node's secret seed for its local test split: drawn once, kept (0600) so the split is stable."""
    path = state_dir / SPLIT_SEED_FILE
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{secrets.randbits(63)}\n")
    return int(path.read_text().strip())


def _rows(path: str, stamp: tuple[int, ...], text_column: str, label_column: str, labels: tuple[str, ...],
          seed: int | None, task_name: str) -> NodeRows:
    task = get_task(task_name)
    skipped: list[str] = []
    mine = task.read_file(Path(path), text_column=text_column, label_column=label_column, labels=labels,
                          skipped=skipped)
    if skipped:  # the node's own log only; the rows are left out of training
        log.warning("%d problem(s) in the data file; the rows concerned are left out: %s", len(skipped),
                    "; ".join(skipped[:20]))
    if seed is None or len(mine.dataset) < 10:
        empty = datasets.Dataset(mine.dataset.data.slice(0, 0), fingerprint=fresh_fingerprint())
        train, test = mine, LabelledData(empty, mine.label_names, mine.origin)
    else:
        train, test = holdout_split(mine, LOCAL_TEST_FRACTION, seed)
    return NodeRows(train, test, task.fingerprint(train), task_name)


def load_rows(config: NodeConfig, labels: tuple[str, ...], *, local_eval: bool) -> NodeRows:
    """The node's examples of its declared task, labels mapped onto ``labels`` (the declared labels, in the run's
    class order; cached while the file is unchanged: same inode, size, modification and change times)."""
    try:
        info = config.data_path.stat()
    except OSError as err:
        raise DataError(f"data file {config.data_path}: {err.strerror or err}", code="DATA_MISSING") from err
    seed = None
    if local_eval:  # a simulation run with a reproducible seed also repeats its local split
        seed = split_seed(config.state_dir) if config.insecure_seed is None else int.from_bytes(
            hashlib.sha256(f"split/{config.insecure_seed}/{config.node}".encode()).digest()[:7], "big")
    key: RowsKey = (str(config.data_path), (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns),
                    config.text_column, config.label_column, labels, seed, config.task)
    rows = ROWS.get(key)
    if rows is None:
        rows = _rows(*key)
        ROWS.put(key, rows)
    if rows.num_train < 1:
        raise DataError(f"{config.data_path}: no training examples", code="DATA_EMPTY")
    return rows


def tensors(rows: NodeRows, part: Literal["train", "test"], model_path: str, max_len: int) -> Tensors:
    """Token tensors of the train or test part for the base model (tokenised once per process and model)."""
    key = (part, model_path, max_len)
    if key not in rows._tensors:
        data = rows.train if part == "train" else rows.test
        task = get_task(rows.task)
        rows._tensors[key] = task.encode(task.load_base(model_path), data, max_len, strict=False)
        ROWS.recount(rows)
    return rows._tensors[key]


def train_inputs(rows: NodeRows, model_path: str, max_len: int, lora: LoraSettings) -> dict[str, torch.Tensor]:
    """What the trainer feeds the model: the task's inputs for the encoded training part (the encoded tensors by
    name, or for a classifier whose LoRA starts at layer k > 0 the frozen layers' output ``hidden_states``
    [N, T, H] in place of ``input_ids``: see the task's ``train_inputs``).

    Computed once per process, node, model and LoRA layers (a fixed function of each example: caching it changes
    nothing about DP, and every step then runs only the layers that train).
    """
    key = (model_path, max_len, tuple(lora.layers))
    if key not in rows._inputs:
        task = get_task(rows.task)
        encoded = tensors(rows, "train", model_path, max_len)
        rows._inputs[key] = task.train_inputs(task.load_base(model_path), encoded, lora)
        ROWS.recount(rows)
    return dict(rows._inputs[key])
