"""Checks run before any Flower process starts, so bad input fails fast and clearly."""

from __future__ import annotations

import torch

from fedtune.common.data import LabelledData, load_labelled
from fedtune.common.errors import ConfigError
from fedtune.common.model import build_model, load_base
from fedtune.common.settings import RunSettings


def preflight(settings: RunSettings, num_clients: int) -> LabelledData:
    """Validate model, LoRA targets, data file/schema and its size; raise a FedtuneError on any problem."""
    data = load_labelled(settings.data)
    build_model(load_base(settings.model.model_path), data.num_labels, settings.lora, torch.device("cpu"))
    if len(data.dataset) < 2 * num_clients:
        raise ConfigError(f"{settings.data.dataset}: {len(data.dataset)} examples are too few for "
                          f"{num_clients} clients; use fewer clients or more data")
    return data
