"""Checks run before any Flower process starts, so bad input fails fast and clearly."""

from __future__ import annotations

import torch

from fedtune.common.data.table import LabelledData
from fedtune.common.errors import ConfigError
from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task


def preflight(settings: RunSettings, num_clients: int) -> LabelledData:
    """Validate model, LoRA targets, data file/schema, every example's length and the data's size; raise a
    FedtuneError on any problem (before any Flower process starts)."""
    task = get_task(settings.model.task)
    data = task.load_data(settings.data)
    base = task.load_base(settings.model.model_path)
    task.build_model(base, data.label_names, settings.lora, torch.device("cpu"))
    if not task.truncates:  # a sequence longer than the model's context: file + line
        task.encode(base, data, settings.model.max_seq_len)
    if len(data.dataset) < 2 * num_clients:
        raise ConfigError(f"{settings.data.dataset}: {len(data.dataset)} examples are too few for "
                          f"{num_clients} clients; use fewer clients or more data")
    return data
