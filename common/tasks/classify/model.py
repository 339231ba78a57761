"""The sentence classifier: the encoder, masked mean pooling and a zero-initialised linear head, with LoRA.

That is how sentence encoders such as all-MiniLM-L6-v2 were trained; a freshly initialised BERT pooler + head
(what ``AutoModelForSequenceClassification`` adds) stays at the majority class under DP-SGD at epsilon 8 in our
trials, while this head learns.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedtune.common.models.base import BaseModel, attach_lora, encode, lora_layers
from fedtune.common.models.device import autocast
from fedtune.common.settings import LoraSettings

HEAD_NAME = "head"


class SentenceClassifier(nn.Module):
    """Encoder -> masked mean pooling -> linear head (zero-initialised).

    With ``cut`` > 0 (LoRA only in layers >= cut) the forward pass may start from ``hidden_states``, the
    output of the frozen layers below ``cut`` (see :func:`lower_states`): those layers are a fixed function
    of each example, so a node computes them once and every training step runs only the layers that train.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, cut: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)
        self.cut = cut
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask: [B, T] (or hidden_states [B, T, H] after layer `cut`) -> logits [B, num_labels]
        assert attention_mask is not None
        if hidden_states is not None:
            states = top_layers(self.encoder, hidden_states, attention_mask, self.cut)
        else:
            if input_ids is None:
                raise ValueError("the classifier needs input_ids or hidden_states")
            states = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(self.encoder, input_ids)
            ).last_hidden_state  # [B, T, H]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # [B, T, 1]
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        return self.head(pooled)


def frozen_prefix(encoder: nn.Module, lora: LoraSettings) -> int:
    """How many bottom layers of ``encoder`` stay frozen (no LoRA): the lowest LoRA layer, 0 when every layer
    trains or the encoder is not a BERT-style stack (``encoder.encoder.layer``)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not lora.layers or not isinstance(layers, nn.ModuleList):
        return 0
    chosen = lora_layers(lora, encoder.config, "the base model")
    return min(chosen) if chosen else 0


def position_ids(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Absolute positions [B, T], expanded per example (Opacus needs per-sample shapes: opacus#841): 0.. for BERT,
    from padding_idx + 1 for encoders that count positions after their padding index (MPNet, RoBERTa)."""
    offset = int(getattr(getattr(encoder, "embeddings", None), "padding_idx", -1)) + 1
    return (torch.arange(ids.shape[1], device=ids.device) + offset).expand_as(ids)


def run_layers(encoder: nn.Module, layers: Any, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``layers`` of a BERT-style encoder on states [B, T, H] as the encoder itself runs them: the same attention
    mask and, for encoders with a relative position bias (MPNet), the same bias."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    stack: Any = encoder.encoder  # type: ignore[union-attr]  # a BERT-style encoder
    extra = {"position_bias": stack.compute_position_bias(hidden)} if hasattr(stack, "compute_position_bias") else {}
    for layer in layers:
        out = layer(hidden, mask, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def top_layers(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, cut: int) -> torch.Tensor:
    """Run the layers ``cut..`` of a BERT-style encoder on the states [B, T, H] that layer ``cut - 1`` output."""
    layers: Any = encoder.encoder.layer  # type: ignore[union-attr]  # a BERT-style encoder's layer list
    return run_layers(encoder, layers[cut:], hidden, attention_mask)


@torch.no_grad()
def lower_states(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cut: int,
                 batch_size: int = 256, *, mixed: bool = False) -> torch.Tensor:
    """The frozen encoder's hidden states after layer ``cut - 1`` (embeddings when ``cut`` = 0), [N, T, H], fp32.

    Computed without dropout (eval mode), running the embeddings and layers ``0..cut-1`` only (the layers above
    are not needed): the states are a deterministic function of each example alone. ``mixed``: under the CPU's
    autocast (bfloat16 where the CPU has it), as the training loop computes those layers when nothing is cached.
    """
    was_training = encoder.training
    encoder.eval()
    config: Any = encoder.config
    states = torch.zeros((len(ids), ids.shape[1], int(config.hidden_size)))
    # Shortest first, each batch cut to its longest example; positions past an example's end stay 0 (masked).
    cpu = torch.device("cpu")
    for idx in torch.argsort(mask.sum(dim=1), stable=True).split(batch_size):
        width = max(int(mask[idx].sum(dim=1).max()), 1)
        b_ids, b_mask = ids[idx, :width], mask[idx, :width]
        with autocast(cpu) if mixed else contextlib.nullcontext():
            states[idx, :width] = _lower(encoder, cut, b_ids, b_mask).float()
    encoder.train(was_training)
    return states


def _lower(encoder: nn.Module, cut: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The embeddings and then layers ``0..cut-1`` on one batch: ids, mask [B, T] -> states [B, T, H]."""
    embeddings: Any = encoder.embeddings  # type: ignore[union-attr]  # a BERT-style encoder
    layers: Any = encoder.encoder.layer  # type: ignore[union-attr]
    hidden = embeddings(input_ids=ids, position_ids=position_ids(encoder, ids))
    return run_layers(encoder, layers[:cut], hidden, mask)


def lora_config(settings: LoraSettings, layers: list[int] | None = None) -> LoraConfig:
    """PEFT's config; ``layers`` = :func:`~fedtune.common.models.base.lora_layers` of the model (None: every layer)."""
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # PEFT's hint says int; it scales by a float
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=[HEAD_NAME],
        layers_to_transform=layers,
        bias="none",
    )


def build_classifier(base: BaseModel, num_labels: int, cut: int = 0) -> SentenceClassifier:
    """A fresh classifier over a private copy of the cached base encoder."""
    return SentenceClassifier(copy.deepcopy(base.encoder), base.hidden_size, num_labels, cut)


def build_model(
    base: BaseModel, num_labels: int, lora: LoraSettings, device: torch.device, seed: int = 0
) -> PeftModel:
    """Classifier with LoRA adapters; only LoRA factors and the head are trainable.

    The model is moved to ``device`` *before* PEFT wraps it (opacus#820: moving a
    wrapped model afterwards silently corrupts LoRA updates under Opacus).
    With ``lora-variant = "ffa"`` (FFA-LoRA, Sun et al. 2024) the A factors keep
    their seeded initialisation on every node and only B (and the head) train, so
    averaging B across clients averages the adapters' products exactly.
    """
    torch.manual_seed(seed)  # LoRA A init; identical on every node that uses the same seed
    model = build_classifier(base, num_labels, frozen_prefix(base.encoder, lora)).to(device)
    layers = lora_layers(lora, base.encoder.config, base.path)
    return attach_lora(model, lora_config(lora, layers), lora, base.path)


def probabilities(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_len: int,
                  batch_size: int = 64) -> np.ndarray:
    """Softmax class probabilities [N, num_labels] of the sentence classifier, on CPU, in input order."""
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode(tokenizer, texts[start:start + batch_size], max_len)
            width = int(mask.sum(dim=1).max())
            logits = model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).float()
            out.append(torch.softmax(logits, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
