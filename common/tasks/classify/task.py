"""Sentence classification: the encoder, masked mean pooling and a linear head (``fedtune.common.models.base``)."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedtune.common.tasks.base import Batch, Encoded, named
from fedtune.common.tasks.classify.card import CARD

if TYPE_CHECKING:
    from peft import PeftModel

    from fedtune.common.data.table import LabelledData
    from fedtune.common.models.base import BaseModel, BaseModelRef
    from fedtune.common.settings import DataSettings, LoraSettings
    from fedtune.common.tasks.result import EvalResult

# fedtune.json's description of the head (the model is fedtune's own, not a stock transformers class)
HEAD_DESCRIPTION = "masked mean pooling -> linear (fedtune.common.tasks.classify.model.SentenceClassifier)"


class Classify:
    name = "classify"
    pipeline_tag = "text-classification"
    headline = "accuracy"
    truncates = True
    labelled = True  # examples carry labels or tags from a declared set
    # fedtune-sim's default job (the main job): a recipe for all-mpnet-base-v2 (docs/results.md, accuracy study);
    # with --model the settings' own defaults apply instead.
    presets: dict[str, Any] = {"model-path": "all-mpnet-base-v2", "lora-layers": "-1", "max-train-examples": 2000,
                               "num-rounds": 2, "local-epochs": 2.0, "fraction-evaluate": 0.0}
    clients = 5  # fedtune-sim's default job
    adapter_fields: Mapping[str, Any] = {"head": HEAD_DESCRIPTION}
    card = CARD

    def __init__(self) -> None:
        self._eval_states: dict[tuple[int, int, int], tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def base_ref(self, model_path: str, hub_id: str = "") -> BaseModelRef:
        from fedtune.common.models.base import base_model_ref

        return base_model_ref(model_path, hub_id)

    def load_base(self, model_path: str) -> BaseModel:
        from fedtune.common.models.base import load_base

        return load_base(model_path)

    def load_data(self, settings: DataSettings) -> LabelledData:
        from fedtune.common.tasks.classify.data import load_labelled

        return load_labelled(settings)

    def read_file(self, path: Path, *, text_column: str, label_column: str, labels: Sequence[str],
                  skipped: list[str] | None = None) -> LabelledData:
        if len(labels) < 2:
            from fedtune.common.errors import DataError

            raise DataError(f"the run names {len(labels)} labels; {self.name} needs at least 2", code="DATA_LABELS")
        from fedtune.common.data.table import read_table
        from fedtune.common.tasks.classify.data import validate

        return validate(read_table(path), text_column, label_column, list(labels), origin=str(path), skipped=skipped)

    def write_partition(self, part: LabelledData, directory: Path) -> Path:
        names = part.label_names
        frame = part.dataset.to_pandas()[["text", "label"]]
        frame["label"] = [names[i] for i in frame["label"]]
        directory.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(directory / "data.parquet", index=False)
        return directory / "data.parquet"

    def fingerprint(self, data: LabelledData) -> str:
        digest = hashlib.sha256()
        for text, label in zip(data.dataset["text"], data.dataset["label"], strict=True):
            digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()

    def encode(self, base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
        from fedtune.common.models.base import encode

        ids, mask = encode(base.tokenizer, data.dataset["text"], max_len)
        return ids, mask, torch.tensor(list(data.dataset["label"]), dtype=torch.long)

    def build_model(self, base: BaseModel, labels: Sequence[str], lora: LoraSettings, device: torch.device,
                    seed: int = 0) -> PeftModel:
        from fedtune.common.tasks.classify.model import build_model

        return build_model(base, len(labels), lora, device, seed=seed)

    def train_inputs(self, base: BaseModel, encoded: Encoded, lora: LoraSettings) -> dict[str, torch.Tensor]:
        """With LoRA only in layers >= k > 0, the frozen layers below k are a fixed function of each example: their
        output ``hidden_states`` [N, T, H] stands in for ``input_ids`` and every step runs only the layers that
        train (caching them changes nothing about DP)."""
        from fedtune.common.tasks.classify.model import frozen_prefix, lower_states

        cut = frozen_prefix(base.encoder, lora)
        if cut == 0:
            return named(encoded)
        ids, mask, labels = encoded
        states = lower_states(base.encoder, ids, mask, cut, mixed=True)
        return {"hidden_states": states, "attention_mask": mask, "labels": labels}

    def loss(self, module: nn.Module, batch: Batch, *, fixed_shape: bool = False) -> torch.Tensor:
        # every shape follows the batch's: fixed_shape needs nothing more here
        # input_ids, or the frozen lower layers' cached states (hidden_states), with attention_mask
        logits = module(**{k: v for k, v in batch.items() if k != "labels"}).float()  # [B, L]
        return nn.functional.cross_entropy(logits, batch["labels"])

    def evaluate(self, model: nn.Module, base: BaseModel, data: LabelledData, encoded: Encoded, *,
                 device: torch.device, groups: Sequence[str] | None = None, detail: bool = False) -> EvalResult:
        """With LoRA only above the frozen layers, those layers' output for ``encoded`` is computed once per process
        and reused by every later evaluation of the same examples (the server scores the held-out set each round)."""
        from fedtune.common.tasks.classify.evaluation import evaluate

        cut = int(getattr(getattr(getattr(model, "base_model", model), "model", model), "cut", 0))
        return evaluate(model, *encoded, device=device, groups=groups,
                        states=self._states(base, encoded, cut) if cut else None)

    def _states(self, base: BaseModel, encoded: Encoded, cut: int) -> torch.Tensor:
        from fedtune.common.tasks.classify.model import lower_states

        ids, mask, _ = encoded
        key = (id(ids), id(base.encoder), cut)
        held = self._eval_states.get(key)
        if held is None or held[0]() is not ids:  # an id reused by a new tensor is a new set
            self._eval_states.clear()  # one set at a time: the server's held-out set, or a node's test split
            held = (weakref.ref(ids), lower_states(base.encoder, ids, mask, cut, mixed=True))
            self._eval_states[key] = held
        return held[1]

    def summary_fields(self, held_out: LabelledData, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        from fedtune.common.tasks.classify.baseline import summary_fields

        return summary_fields(held_out, rounds)


CLASSIFY = Classify()
