"""Named-entity recognition: token classification with BIO tags, LoRA on the encoder and a linear token head.

The model is the stock ``AutoModelForTokenClassification`` (for BERT: ``BertForTokenClassification``) over
the base encoder, its head zero-initialised (a random head learns slowly under DP-SGD), wrapped by PEFT
as a token-classification adapter: the saved adapter loads with ``AutoModelForTokenClassification`` +
``PeftModel.from_pretrained`` and no fedtune import. Words are split into sub-words; the first sub-word of
each word carries the word's tag, the others none. The unit of privacy is the sentence: its loss is the
mean over its words, and Opacus clips the gradient of that per-sentence loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedtune.common.errors import DataError, ModelError
from fedtune.common.models.device import autocast
from fedtune.common.tasks.base import IGNORE, Batch, Encoded, named, per_example_mean, trim
from fedtune.common.tasks.ner.card import CARD

if TYPE_CHECKING:
    from peft import PeftModel

    from fedtune.common.data.table import LabelledData
    from fedtune.common.models.base import BaseModel, BaseModelRef
    from fedtune.common.settings import DataSettings, LoraSettings
    from fedtune.common.tasks.result import EvalResult

HEAD = "classifier"  # the head's name in AutoModelForTokenClassification (saved with the adapter)


def _check_context(base: BaseModel, data: LabelledData, words: list[list[str]]) -> None:
    """DataError naming each sentence longer than the model's context (in sub-word tokens)."""
    from fedtune.common.models.base import model_context

    full = base.tokenizer(words, is_split_into_words=True, add_special_tokens=True)
    context = model_context(base)
    lines = list(data.dataset["line"]) if "line" in data.dataset.column_names else range(1, len(words) + 1)
    problems = [f"{data.origin or 'data'} line {line}: {len(ids)} sub-word tokens, longer than the model's "
                f"context of {context}"
                for line, ids in zip(lines, full["input_ids"], strict=True) if len(ids) > context]
    if problems:
        raise DataError(problems[:20], code="DATA_SCHEMA")


def encode_tokens(base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
    """input_ids / attention_mask / labels [N, max_len]; a word's tag on its first sub-word, else IGNORE."""
    tok = base.tokenizer
    words = [list(w) for w in data.dataset["tokens"]]
    tags = [list(t) for t in data.dataset["tags"]]
    if strict:
        _check_context(base, data, words)
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_len, padding="max_length",
              return_tensors="pt")
    labels = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
    for i, sentence_tags in enumerate(tags):
        previous = None
        for pos, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, pos] = sentence_tags[word]
            previous = word
    return enc["input_ids"], enc["attention_mask"], labels


def _logits(module: nn.Module, batch: Batch) -> torch.Tensor:
    ids = batch["input_ids"]
    # position_ids expanded to [B, T]: Opacus needs per-sample shapes (opacus#841).
    position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return module(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=position_ids).logits.float()


class Ner:
    name = "ner"
    pipeline_tag = "token-classification"
    headline = "entity-f1"
    truncates = False
    labelled = True  # examples carry labels or tags from a declared set
    clients = 3  # fedtune-sim's default job
    adapter_fields: Mapping[str, Any] = {}
    card = CARD
    presets: dict[str, Any] = {
        "dataset": "conll-sample", "max-seq-len": 64, "lora-targets": "query,value", "lora-layers": "", "lora-rank": 4,
        "lora-alpha": 8.0, "num-rounds": 5, "local-epochs": 2.0, "batch-size": 48, "optimizer": "sgd",
        "learning-rate": 0.5, "lora-lr-scale": 0.2, "partitioner": "iid", "test-fraction": 0.2,
        "max-train-examples": 0,
    }

    def base_ref(self, model_path: str, hub_id: str = "") -> BaseModelRef:
        from fedtune.common.models.base import base_model_ref

        return base_model_ref(model_path, hub_id)

    def load_base(self, model_path: str) -> BaseModel:
        from fedtune.common.models.base import load_base

        return load_base(model_path)

    def load_data(self, settings: DataSettings) -> LabelledData:
        from fedtune.common.data.corpus import conll_sample
        from fedtune.common.data.sequence import read_token_file, token_data

        if settings.dataset == "conll-sample":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "conll-sample.conll"
                path.write_bytes(conll_sample())
                data = read_token_file(path, settings.label_list)
            return type(data)(data.dataset, data.label_names, "conll-sample")
        path = Path(settings.dataset)
        return read_token_file(path, settings.label_list) if path.exists() else token_data([], [], str(path))

    def read_file(self, path: Path, *, text_column: str, label_column: str, labels: Sequence[str],
                  skipped: list[str] | None = None) -> LabelledData:
        if len(labels) < 2:
            from fedtune.common.errors import DataError

            raise DataError(f"the run names {len(labels)} labels; {self.name} needs at least 2", code="DATA_LABELS")
        from fedtune.common.data.sequence import read_token_file

        return read_token_file(path, labels, skipped)

    def write_partition(self, part: LabelledData, directory: Path) -> Path:
        from fedtune.common.data.sequence import write_jsonl

        names = part.label_names
        rows = ({"tokens": t, "tags": [names[i] for i in g]} for t, g in zip(part.dataset["tokens"],
                                                                             part.dataset["tags"], strict=True))
        return write_jsonl(directory / "data.jsonl", rows)

    def fingerprint(self, data: LabelledData) -> str:
        digest = hashlib.sha256()
        for tokens, tags in zip(data.dataset["tokens"], data.dataset["tags"], strict=True):
            digest.update(("\t".join(tokens) + "\n" + ",".join(map(str, tags)) + "\n").encode())
        return digest.hexdigest()

    def encode(self, base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
        return encode_tokens(base, data, max_len, strict=strict)

    def build_model(self, base: BaseModel, labels: Sequence[str], lora: LoraSettings, device: torch.device,
                    seed: int = 0) -> PeftModel:
        from peft import LoraConfig, TaskType
        from transformers import AutoModelForTokenClassification

        from fedtune.common.models.base import attach_lora, lora_layers

        if len(labels) < 2:
            raise ModelError(f"ner needs at least 2 tags, got {list(labels)}")
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)  # LoRA A init; identical on every node that uses the same seed
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head is "missing" from the checkpoint, as intended
        try:
            model = AutoModelForTokenClassification.from_pretrained(
                base.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, attn_implementation="eager")
        except (OSError, ValueError) as err:
            raise ModelError(f"could not load a token classifier from {base.path}: {err}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
        model.requires_grad_(False)
        head = getattr(model, HEAD)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        model = model.to(device)  # before PEFT wraps it (opacus#820)
        config = LoraConfig(task_type=TaskType.TOKEN_CLS, r=lora.lora_rank, lora_alpha=lora.lora_alpha,  # type: ignore[arg-type]  # PEFT's hint says int
                            lora_dropout=lora.lora_dropout, target_modules=lora.target_modules,
                            layers_to_transform=lora_layers(lora, model.config, base.path), modules_to_save=[HEAD],
                            bias="none")
        return attach_lora(model, config, lora, base.path)

    def train_inputs(self, base: BaseModel, encoded: Encoded, lora: LoraSettings) -> dict[str, torch.Tensor]:
        return named(encoded)

    def loss(self, module: nn.Module, batch: Batch, *, fixed_shape: bool = False) -> torch.Tensor:
        # every shape follows the batch's: fixed_shape needs nothing more here
        logits = _logits(module, batch)  # [B, T, L]
        token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE,
                                                 reduction="none")  # [B, T]
        return per_example_mean(token_loss, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, base: BaseModel, data: LabelledData, encoded: Encoded, *,
                 device: torch.device, groups: Sequence[str] | None = None, detail: bool = False) -> EvalResult:
        from fedtune.common.tasks.ner.evaluation import entity_scores
        from fedtune.common.tasks.result import EvalResult

        ids, mask, labels = encoded
        model.eval()
        names = data.label_names
        nll, correct, tokens, predicted = 0.0, 0, 0, []
        for start in range(0, len(ids), 64):
            batch = trim({"input_ids": ids[start:start + 64], "attention_mask": mask[start:start + 64],
                          "labels": labels[start:start + 64]})
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device):
                logits = _logits(model, batch)
            keep = batch["labels"] != IGNORE
            nll += float(nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum"))
            preds = logits.argmax(dim=-1)
            correct += int((preds[keep] == batch["labels"][keep]).sum())
            tokens += int(keep.sum())
            predicted += [[names[int(p)] for p in row[k]] for row, k in zip(preds.cpu(), keep.cpu(), strict=True)]
        if tokens == 0:
            return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
        truth = [[names[t] for t in tags] for tags in data.dataset["tags"]]
        guess = [p + ["O"] * (len(t) - len(p)) for p, t in zip(predicted, truth, strict=True)]  # truncated words: O
        return EvalResult(loss=nll / tokens, accuracy=correct / tokens, num_examples=len(ids),
                          extra=entity_scores(truth, guess))

    def summary_fields(self, held_out: LabelledData, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {}  # a tag's majority says nothing of entity F1


NER = Ner()
