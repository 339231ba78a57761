"""Checks run before any Flower process starts, so bad input fails fast and clearly."""

from __future__ import annotations

from fedtune.common.data import holdout_split, load_labelled
from fedtune.common.errors import ConfigError
from fedtune.common.model import resolve_model_path
from fedtune.common.partition import make_partitioner
from fedtune.common.settings import RunSettings


def preflight(settings: RunSettings, num_clients: int) -> None:
    """Validate model path, data file/schema and the split; raise a FedtuneError on any problem."""
    resolve_model_path(settings.model.model_path)
    data = load_labelled(settings.data)
    if len(data.dataset) < 2 * num_clients:
        raise ConfigError(f"{settings.data.dataset}: {len(data.dataset)} examples are too few for "
                          f"{num_clients} clients; use fewer clients or more data")
    train, _ = holdout_split(data, settings.data.test_fraction, settings.plan.seed)
    make_partitioner(train.dataset, settings.data, num_clients, settings.plan.seed)
