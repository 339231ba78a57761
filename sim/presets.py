"""fedtune-sim's presets: ``--preset NAME`` recipes and each task's default job, under the command line's own."""

from __future__ import annotations

from typing import Any

from fedtune.common.models.registry_models import MPNET
from fedtune.common.tasks import Task

# --preset NAME: settings of a measured recipe (docs/results.md), under every flag and --set.
PRESETS: dict[str, dict[str, Any]] = {
    "best": {"model-path": MPNET, "lora-layers": "-1", "max-train-examples": 0, "num-rounds": 2, "local-epochs": 2.0,
             "fraction-evaluate": 0.0},
}


def task_presets(task: Task, given: dict[str, Any]) -> dict[str, Any]:
    """The default job of ``task`` (kebab keys), under the ``given`` flags and --set. A job that names its model
    (classify) is a recipe for that model: with your own model (``--model``) all of it is dropped and the settings'
    defaults apply. Its cap on training examples is one for its corpus: with your own data (``--dataset``) every
    example is used unless max-train-examples says otherwise. Layer indices counted from the bottom are the
    embedded model's: with your own model such a preset is dropped and the settings' default (the top two layers)
    applies unless lora-layers says otherwise."""
    presets = dict(task.presets)
    own_model = bool(given.get("model-path"))
    if own_model and "model-path" in presets:
        return {}
    if given.get("dataset"):
        presets.pop("max-train-examples", None)
    bottom_up = [t for t in str(presets.get("lora-layers", "")).split(",") if t.strip() and int(t) >= 0]
    if own_model and bottom_up:
        presets.pop("lora-layers", None)
    return presets
