"""What a task contributes to the adapter's model card (``common/models/card.py`` writes the rest).

Each task module holds its own :class:`TaskCard` (``common/tasks/<task>/card.py``): the Hub metadata of its
held-out metrics, the "Model" and "How to use" sections (how to load the adapter), and the evaluation headline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.common.models.card import CardInfo


@dataclass(frozen=True)
class TaskCard:
    """One task's parts of the model card."""

    head: str  # what the adapter holds besides LoRA, as the card's first line says it ("" = nothing)
    embedded: str  # where the task's embedded base model comes from (a package, never a path)
    metrics: tuple[str, ...]  # the metrics named in the card's header
    headline: tuple[tuple[str, str], ...]  # the round line's held-out headline keys -> the card's metric names
    # "Model" and "How to use": (info, LoRA shape, where the base model comes from) -> markdown
    model_section: Callable[[CardInfo, str, str], str]
    evaluation: Callable[[CardInfo], str]  # the held-out headline sentence of the "Evaluation" section

    def results(self, extra: Mapping[str, Any]) -> list[tuple[str, float]]:
        """(metric, value) pairs of the task's held-out headline metrics that are finite numbers."""
        out = []
        for key, name in self.headline:
            value = extra.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out.append((name, float(value)))
        return out


def metric(x: Any) -> str:
    """A held-out metric of the round line: 4 decimals, n/a when missing or not finite."""
    return f"{x:.4f}" if isinstance(x, int | float) and math.isfinite(x) else "n/a"
