"""What a task's held-out evaluation returns (server and nodes alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Confusion = list[list[int]]  # [true label][predicted label] -> count


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    confusion: Confusion = field(default_factory=list)  # [num_labels][num_labels]; empty when no examples
    group_confusion: dict[str, Confusion] = field(default_factory=dict)  # per value of the group column
    extra: dict[str, Any] = field(default_factory=dict)  # the task's own round-line fields (F1, perplexity, ...)
