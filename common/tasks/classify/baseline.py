"""The majority class: what a classifier must beat to be worth anything.

:func:`majority_baseline` is the accuracy of always predicting the held-out set's most frequent class;
:func:`quality_warnings` says so plainly when a run's final model does no better. Both end up in
``summary.json`` (:func:`summary_fields`, the classify task's ``summary_fields``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.common.data.table import LabelledData


@dataclass(frozen=True)
class MajorityBaseline:
    """Always predicting ``label`` scores ``accuracy`` on the held-out set."""

    label: str
    accuracy: float

    def fields(self) -> dict[str, Any]:
        return {"majority-label": self.label, "majority-accuracy": round(self.accuracy, 6)}


def majority_baseline(labels: Sequence[int], names: Sequence[str]) -> MajorityBaseline:
    """The majority-class accuracy of held-out ``labels`` (class indices into ``names``)."""
    if not labels:
        return MajorityBaseline(names[0] if names else "", math.nan)
    index, count = Counter(int(x) for x in labels).most_common(1)[0]
    return MajorityBaseline(names[index] if index < len(names) else str(index), count / len(labels))


def quality_warnings(final_accuracy: float | None, baseline: MajorityBaseline) -> list[str]:
    """A warning when the final held-out accuracy is not above the majority class's."""
    if final_accuracy is None or not math.isfinite(baseline.accuracy):
        return []
    if final_accuracy <= baseline.accuracy:
        return [f"the final held-out accuracy {final_accuracy:.4f} is not above the majority-class accuracy "
                f"{baseline.accuracy:.4f} (always predicting {baseline.label!r}): this model is no better than "
                "that constant"]
    return []


def summary_fields(held_out: LabelledData, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary fields: the held-out set's majority-class accuracy, and a warning when the final model is no better.

    ``rounds`` are the run's metrics lines (their last ``accuracy`` is the final model's)."""
    baseline = majority_baseline(list(held_out.dataset["label"]), held_out.label_names)
    final = rounds[-1].get("accuracy") if rounds else None
    return {**baseline.fields(), "warnings": quality_warnings(final, baseline)}
