"""A node's local examples, loaded, validated, split and tokenised once per process.

In simulation a node's data is its partition (``partition-id`` of
``num-partitions``) of the run's dataset, after the server's held-out split; in
deployment it is the file named by the node config's ``data-path``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from fedtune.common.data import LabelledData, cap, holdout_split, load_labelled
from fedtune.common.errors import ConfigError
from fedtune.common.model import encode, load_base
from fedtune.common.partition import load_partition
from fedtune.common.settings import RunSettings

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [N, T], mask [N, T], labels [N]

LOCAL_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class NodeData:
    train: Tensors
    test: Tensors
    label_names: list[str]
    fingerprint: str  # sha256 over the node's training texts and labels: keys its privacy budget

    @property
    def num_train(self) -> int:
        return len(self.train[2])


def _tensors(data: LabelledData, model_path: str, max_len: int) -> Tensors:
    ids, mask = encode(load_base(model_path).tokenizer, data.dataset["text"], max_len)
    return ids, mask, torch.tensor(list(data.dataset["label"]), dtype=torch.long)


def _fingerprint(data: LabelledData) -> str:
    digest = hashlib.sha256()
    for text, label in zip(data.dataset["text"], data.dataset["label"], strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def federation_split(settings: RunSettings) -> tuple[LabelledData, LabelledData]:
    """(train pool, server held-out test) for a simulated federation; identical on every node."""
    train, test = holdout_split(load_labelled(settings.data), settings.data.test_fraction, settings.plan.seed)
    return cap(train, settings.data.max_train_examples, settings.plan.seed), test


@functools.lru_cache(maxsize=8)
def _federation_split_cached(settings: RunSettings) -> tuple[LabelledData, LabelledData]:
    return federation_split(settings)


@functools.lru_cache(maxsize=16)
def load_node_data(
    settings: RunSettings, partition_id: int | None, num_partitions: int | None, data_path: str | None
) -> NodeData:
    """The node's train/local-test tensors (cached per process: simulation actors are reused)."""
    if data_path:
        mine = load_labelled(settings.data, path_override=data_path)
    else:
        if partition_id is None or num_partitions is None:
            raise ConfigError("node config needs data-path (deployment) or partition-id and num-partitions")
        pool, _ = _federation_split_cached(settings)
        part = load_partition(pool.dataset, settings.data, num_partitions, partition_id, settings.plan.seed)
        mine = LabelledData(part, pool.label_names)
    if len(mine.dataset) < 10:  # too few to hold any out: evaluate on nothing rather than fail
        train, test = mine, LabelledData(mine.dataset.select([]), mine.label_names)
    else:
        train, test = holdout_split(mine, LOCAL_TEST_FRACTION, settings.plan.seed)
    path, max_len = settings.model.model_path, settings.model.max_seq_len
    return NodeData(
        train=_tensors(train, path, max_len), test=_tensors(test, path, max_len),
        label_names=mine.label_names, fingerprint=_fingerprint(train),
    )
