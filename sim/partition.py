"""Splitting one dataset between simulated clients with ``flwr-datasets`` partitioners."""

from __future__ import annotations

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    GroupedNaturalIdPartitioner,
    IidPartitioner,
    Partitioner,
)

from fedtune.common.errors import ConfigError
from fedtune.common.settings import DataSettings


def make_partitioner(
    dataset: datasets.Dataset, settings: DataSettings, num_partitions: int, seed: int
) -> Partitioner:
    """Build the configured partitioner over ``dataset``.

    ``natural`` groups the distinct values of ``partition-by`` (e.g. movies) into
    ``num_partitions`` clients of about equal numbers of ids, so each client sees
    its own movies; ``dirichlet`` skews label proportions with concentration alpha.
    """
    if num_partitions <= 0:
        raise ConfigError(f"number of partitions must be > 0, got {num_partitions}")
    partitioner: Partitioner
    if settings.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif settings.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=settings.dirichlet_alpha,
            min_partition_size=2, self_balancing=True, seed=seed,
        )
    else:
        column = settings.partition_by
        if column not in dataset.column_names:
            raise ConfigError(
                f"partition-by column '{column}' is not in the data (columns: {', '.join(dataset.column_names)}); "
                "name a column that groups the examples with --set partition-by=COLUMN, or split at random with "
                "--partitioner iid"
            )
        ids = len(set(dataset[column]))
        if ids < num_partitions:
            raise ConfigError(
                f"natural split needs at least {num_partitions} distinct '{column}' values, found {ids}"
            )
        partitioner = GroupedNaturalIdPartitioner(
            partition_by=column, group_size=ids // num_partitions, mode="allow-bigger"
        )
    partitioner.dataset = dataset
    return partitioner


def load_partition(
    dataset: datasets.Dataset, settings: DataSettings, num_partitions: int, partition_id: int, seed: int
) -> datasets.Dataset:
    """One client's share of ``dataset``."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    return make_partitioner(dataset, settings, num_partitions, seed).load_partition(partition_id)
