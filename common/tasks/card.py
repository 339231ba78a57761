"""The model card's task-specific parts for the ner and sft tasks (the classify card is ``common/models/card.py``'s).

Both adapters are stock PEFT adapters over stock transformers classes, so the card shows how to load them
with ``transformers`` + ``peft`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.common.models.card import CardInfo

# Hub metadata per task: (model-index task type, metrics named in the card header)
HUB = {"ner": ("token-classification", ["f1", "precision", "recall", "accuracy", "loss"]),
       "sft": ("text-generation", ["perplexity", "loss"])}
# the round line's headline keys -> the card's metric names
HEADLINE = {"ner": (("entity-f1", "f1"), ("entity-precision", "precision"), ("entity-recall", "recall")),
            "sft": (("perplexity", "perplexity"),)}


def hub_results(task: str, extra: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(metric, value) pairs of the task's held-out headline metrics that are finite numbers."""
    out = []
    for key, name in HEADLINE.get(task, ()):
        value = extra.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((name, float(value)))
    return out


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def model_section(info: CardInfo, shape: str, where: str) -> str:
    """Model, task and how to load (stock transformers + peft) for ner / sft."""
    return (_ner_section if info.meta.task == "ner" else _sft_section)(info, shape, where)


def _ner_section(info: CardInfo, shape: str, where: str) -> str:
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


def _sft_section(info: CardInfo, shape: str, where: str) -> str:
    meta, base = info.meta, info.meta.base.name
    return f"""## Model

- **Base model**: `{base}`, {where}.
- **Architecture**: the causal language model itself (`AutoModelForCausalLM`); no head is added.
  LoRA (PEFT) {shape}. Norms, embeddings and the output layer stay frozen.
- **Task**: instruction tuning (SFT) on prompt-response pairs; the loss covers the response tokens only.
  Pairs are laid out in the base model's ChatML chat format and truncated to {meta.max_seq_len} tokens.

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

tok = AutoTokenizer.from_pretrained("{base}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "path/to/adapter").eval()
ids = tok.apply_chat_template([{{"role": "user", "content": "How was your weekend?"}}],
                              add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=40)[0, ids.shape[1]:], skip_special_tokens=True))
```
"""


def evaluation_lines(info: CardInfo) -> str:
    """The held-out headline metric of ner / sft, for the card's evaluation section."""
    extra = info.extra
    if info.meta.task == "ner":
        return (f"entity-level F1 **{_fmt(extra.get('entity-f1'))}** (precision {_fmt(extra.get('entity-precision'))},"
                f" recall {_fmt(extra.get('entity-recall'))}; seqeval span matching: type and both boundaries must"
                f" match), token accuracy {_fmt(info.accuracy)}, cross-entropy loss {_fmt(info.loss)}. "
                "Per entity type:")
    return (f"perplexity of the response tokens **{_fmt(extra.get('perplexity'))}** (mean cross-entropy "
            f"{_fmt(info.loss)} per response token), next-token accuracy {_fmt(info.accuracy)}.")
