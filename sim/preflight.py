"""Checks run before any Flower process starts, so bad input fails fast and clearly."""

from __future__ import annotations

import torch

from fedtune.common.data.table import LabelledData, federation_split
from fedtune.common.errors import ConfigError
from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task
from fedtune.sim.partition import make_partitioner


def preflight(settings: RunSettings, num_clients: int) -> LabelledData:
    """Validate model, LoRA targets, data file/schema, every example's length, the data's size and (with more
    than one node) that the partitioner fits the data; raise a FedtuneError on any problem, before any file of
    the run is written. The central baseline is one node: pass ``num_clients=1`` (no split to check)."""
    task = get_task(settings.model.task)
    data = task.load_data(settings.data)
    base = task.load_base(settings.model.model_path)
    task.build_model(base, data.label_names, settings.lora, torch.device("cpu"))
    if not task.truncates:  # a sequence longer than the model's context: file + line
        task.encode(base, data, settings.model.max_seq_len)
    if len(data.dataset) < 2 * num_clients:
        raise ConfigError(f"{settings.data.dataset}: {len(data.dataset)} examples are too few for "
                          f"{num_clients} clients; use fewer clients or more data")
    if num_clients > 1:
        d = settings.data
        pool, _ = federation_split(data, d.test_fraction, settings.federation.seed, d.max_train_examples)
        make_partitioner(pool.dataset, d, num_clients, settings.federation.seed)
    return data
