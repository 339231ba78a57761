"""What a fine-tuning task is: how examples are read and encoded, which model wraps the base, how a batch's
loss is computed under Opacus, and how the held-out set is evaluated.

Rounds, budgets, ledgers, the wire contract and aggregation never look at the task: they see encoded
tensors, a loss, and adapter tensors. A task only decides what happens *inside* one example, and every
loss is a mean over examples of a per-example loss that depends on that example alone, so Opacus'
per-sample clipping bounds each example's (one sentence's, one prompt-response pair's) contribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from fedtune.common.data.table import LabelledData
    from fedtune.common.models.base import BaseModel, BaseModelRef
    from fedtune.common.settings import DataSettings, LoraSettings
    from fedtune.common.tasks.card import TaskCard
    from fedtune.common.tasks.result import EvalResult

# input_ids [N, T], attention_mask [N, T], labels [N] (classify) or [N, T] (ner, sft; -100 = no loss)
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# One batch: the same three tensors by name (the keys of a Hugging Face batch).
Batch = Mapping[str, torch.Tensor]
IGNORE = -100  # label of a token that carries no loss (padding, prompt, non-first sub-words)


class Task(Protocol):
    """One fine-tuning task; the implementations live beside this module."""

    name: str  # the `task` setting's value
    pipeline_tag: str  # the Hugging Face pipeline the adapter serves (model card, fedtune.json)
    headline: str  # the held-out metric reported first: accuracy, entity-f1 or perplexity
    @property
    def presets(self) -> Mapping[str, Any]:
        """fedtune-sim --task: default settings (kebab keys) of this task's job."""
        ...

    truncates: bool  # encode cuts a long example to max-seq-len (never rejects one): no length check needed
    labelled: bool  # examples carry a label or tags from a set the node declares (`labels`)
    clients: int  # fedtune-sim --task: the default job's number of simulated clients
    adapter_fields: Mapping[str, Any]  # the task's own fields of the adapter's fedtune.json (classify: its head)
    card: TaskCard  # the model card's task-specific parts (how to load, the headline metric)

    def load_base(self, model_path: str) -> BaseModel:
        """Tokenizer and frozen base model (cached per process); "" = the task's embedded model."""
        ...

    def load_data(self, settings: DataSettings) -> LabelledData:
        """The run's dataset (built-in corpus or file), validated; every bad line named."""
        ...

    def read_file(self, path: Path, *, text_column: str, label_column: str, labels: Sequence[str],
                  skipped: list[str] | None = None) -> LabelledData:
        """A node's data file, validated against its declared labels; every bad line named. With ``skipped``
        (a node's round), rows that fail a check are left out and described there instead of failing the read:
        what a node replies must not depend on one row."""
        ...

    def write_partition(self, part: LabelledData, directory: Path) -> Path:
        """Write a simulated node's share in a format :meth:`read_file` reads; return the file."""
        ...

    def fingerprint(self, data: LabelledData) -> str:
        """sha256 over the examples (recorded in the node's ledger; never sent)."""
        ...

    def encode(self, base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
        """Tokenise, truncating to ``max_len``; ``strict``: a sequence longer than the model's context raises
        DataError naming file and line (the operator's check; a node's round truncates it like any other)."""
        ...

    def build_model(self, base: BaseModel, labels: Sequence[str], lora: LoraSettings, device: torch.device,
                    seed: int = 0) -> PeftModel:
        """A fresh model with LoRA adapters; only adapter (and head) tensors train."""
        ...

    def base_ref(self, model_path: str, hub_id: str = "") -> BaseModelRef:
        """How the adapter names its base model (never by a path of this machine)."""
        ...

    def train_inputs(self, base: BaseModel, encoded: Encoded, lora: LoraSettings) -> dict[str, torch.Tensor]:
        """What the trainer feeds the model for the encoded training examples, by name (see :func:`named`); a task
        may put a fixed function of each example in place of ``input_ids`` (classify with LoRA above layer 0: the
        frozen lower layers' output ``hidden_states`` [N, T, H]). A node computes it once per job and model."""
        ...

    def loss(self, module: nn.Module, batch: Batch, *, fixed_shape: bool = False) -> torch.Tensor:
        """Mean over the batch's examples of each example's own loss (scalar). ``fixed_shape``: every tensor the
        model computes has a shape set by the batch's shape alone (no shortcut that depends on the rows)."""
        ...

    def evaluate(self, model: nn.Module, base: BaseModel, data: LabelledData, encoded: Encoded, *,
                 device: torch.device, groups: Sequence[str] | None = None, detail: bool = False) -> EvalResult:
        """Held-out loss, accuracy and the task's own metrics (``EvalResult.extra``); ``detail`` adds what
        only the server's report shows (sft: a few generated answers)."""
        ...

    def summary_fields(self, held_out: LabelledData, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The task's own fields of summary.json, from the held-out set and the run's metrics lines (classify: the
        majority class and a warning when the final model is no better; the others: none)."""
        ...


def named(encoded: Encoded) -> dict[str, torch.Tensor]:
    """An encoded triple by name: the keys of a Hugging Face batch."""
    ids, mask, labels = encoded
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_example_mean(token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean token loss.

    ``token_loss`` and ``labels`` are [B, T]; positions labelled IGNORE count nowhere. Normalising per
    example (not by the batch's token count) keeps example i's gradient a function of example i alone,
    which is what per-sample clipping assumes.
    """
    keep = (labels != IGNORE).to(token_loss.dtype)  # [B, T]
    per_example = (token_loss * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # [B]
    return per_example.mean()


def trim(batch: Batch) -> dict[str, torch.Tensor]:
    """Drop the padding columns every example of the batch shares (right padding): the batch is padded only
    to its own longest example. Every tensor of two or more dimensions has the sequence on dimension 1."""
    mask = batch["attention_mask"]
    width = int(mask.sum(dim=1).max()) if len(mask) else mask.shape[1]
    return {k: v[:, :width] if v.dim() >= 2 else v for k, v in batch.items()}
