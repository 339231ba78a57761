"""Fine-tuning tasks, chosen with one setting: ``task = classify | ner | sft``."""

from __future__ import annotations

from fedtune.common.tasks.base import IGNORE, Batch, Encoded, Task

__all__ = ["DEFAULT_TASK", "IGNORE", "TASKS", "Batch", "Encoded", "Task", "get_task"]

TASKS = ("classify", "ner", "sft")  # the values of the `task` setting
DEFAULT_TASK = TASKS[0]


def get_task(name: str) -> Task:
    """The task named by the ``task`` setting (imports its module lazily)."""
    if name == "classify":
        from fedtune.common.tasks.classify.task import CLASSIFY

        return CLASSIFY
    if name == "ner":
        from fedtune.common.tasks.ner.task import NER

        return NER
    if name == "sft":
        from fedtune.common.tasks.sft.task import SFT

        return SFT
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
