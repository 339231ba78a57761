"""Adapter tensors on the wire and on disk.

Only trainable tensors travel (LoRA factors and the classifier head), as a Flower
``ArrayRecord`` keyed by PEFT's adapter state-dict names; the frozen base model
never leaves a node. On disk the final adapter is PEFT's own format, so
``PeftModel.from_pretrained(classifier, dir)`` loads it, plus ``fedtune.json`` (base model by Hub id or
directory name, labels, sequence length) from which ``load_adapter`` rebuilds the classifier anywhere.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedTokenizerBase

from fedtune.common.errors import ModelError
from fedtune.common.model import BaseModelRef, build_classifier, check_base, load_base, probabilities, resolve_base

Arrays = dict[str, np.ndarray]
# The largest absolute value an adapter tensor may hold, on the wire in either direction. Trained LoRA factors and
# heads stay orders of magnitude below it; a value beyond it can only be an attempt to overflow a node's forward
# pass (the loss of a chosen row becomes inf, and whether training then fails would tell the sender whether that
# row was sampled) or to plant weights that dominate everyone's next round.
MAX_ADAPTER_VALUE = 1e4


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """Trainable adapter tensors (detached, on CPU), in a stable order."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in sorted(state.items()))


def to_arrays(model: PeftModel) -> Arrays:
    return {k: v.numpy() for k, v in adapter_state(model).items()}


def to_record(model: PeftModel) -> ArrayRecord:
    return ArrayRecord(adapter_state(model))


def record_to_arrays(record: ArrayRecord) -> Arrays:
    return {k: record[k].numpy() for k in record}


def arrays_to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in arrays.items()))


def sent_arrays(arrays: Arrays, lora_variant: str) -> Arrays:
    """The tensors a node sends back: all trainable ones. Under FFA-LoRA the A factors keep the server's shared
    value (they never train), so only B and the head travel; the server restores A (:func:`with_frozen`)."""
    if lora_variant != "ffa":
        return arrays
    return {k: v for k, v in arrays.items() if "lora_A" not in k}


def with_frozen(update: Arrays, reference: Arrays) -> Arrays:
    """A node's update completed with the tensors it did not send, at the value the server sent."""
    return {k: update[k] if k in update else reference[k] for k in reference}


def _value_problem(name: str, value: np.ndarray, dtype: np.dtype) -> str | None:
    """What is wrong with ``value`` as a tensor of ``dtype``: checked *after* the cast, since a float64 value above
    float32's range passes a float64 finiteness check and loads as inf."""
    if not np.issubdtype(value.dtype, np.floating):
        return f"{name}: dtype {value.dtype}, expected a floating-point tensor"
    with np.errstate(over="ignore", invalid="ignore"):
        cast = value.astype(dtype, copy=False)
    if not np.all(np.isfinite(cast)):
        return f"{name}: contains NaN or inf (as {dtype})"
    if cast.size and float(np.max(np.abs(cast))) > MAX_ADAPTER_VALUE:
        return f"{name}: values up to {float(np.max(np.abs(cast))):.3g}, above the bound {MAX_ADAPTER_VALUE:g}"
    return None


def check_arrays(arrays: Arrays, reference: Arrays) -> list[str]:
    """Problems that make ``arrays`` unusable in place of ``reference`` (names, shapes, dtype, NaN/inf after the cast
    to the reference's dtype, magnitude above MAX_ADAPTER_VALUE)."""
    problems = []
    if missing := sorted(set(reference) - set(arrays)):
        problems.append(f"missing tensors: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra := sorted(set(arrays) - set(reference)):
        problems.append(f"unexpected tensors: {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name in sorted(set(arrays) & set(reference)):
        if arrays[name].shape != reference[name].shape:
            problems.append(f"{name}: shape {arrays[name].shape}, expected {reference[name].shape}")
        elif (problem := _value_problem(name, arrays[name], reference[name].dtype)) is not None:
            problems.append(problem)
    return problems


def load_arrays(model: PeftModel, arrays: Arrays) -> None:
    """Set the model's adapter tensors, cast to the model's dtypes; each must pass :func:`check_arrays`."""
    reference = to_arrays(model)
    if problems := check_arrays(arrays, reference):
        raise ModelError(["adapter does not fit the model:", *problems])
    state = {k: torch.from_numpy(np.ascontiguousarray(v.astype(reference[k].dtype, copy=False)))
             for k, v in arrays.items()}
    set_peft_model_state_dict(model, state)


META_FILE = "fedtune.json"
META_FORMAT = "fedtune-adapter/1"
HEAD_DESCRIPTION = "masked mean pooling -> linear (fedtune.common.model.SentenceClassifier)"


@dataclass(frozen=True)
class AdapterMeta:
    """What ``fedtune.json`` beside a saved adapter says: enough to rebuild the classifier anywhere."""

    base: BaseModelRef
    labels: list[str]
    max_seq_len: int
    task: str = "classify"  # the `task` setting: classify, ner or sft

    def to_json(self) -> dict[str, Any]:
        from fedtune.common.tasks import get_task

        out = {"format": META_FORMAT, "task": get_task(self.task).pipeline_tag, "fedtune-task": self.task,
               "base_model": self.base.to_json(), "labels": self.labels, "max_seq_len": self.max_seq_len}
        return out | ({"head": HEAD_DESCRIPTION} if self.task == "classify" else {})

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterMeta:
        path = adapter_dir / META_FILE
        try:
            raw = json.loads(path.read_text())
            base = raw["base_model"]
            return cls(BaseModelRef.from_json(base if isinstance(base, dict) else {"name": base, "source": "local"}),
                       [str(x) for x in raw["labels"]], int(raw.get("max_seq_len") or 128),
                       str(raw.get("fedtune-task", "classify")))
        except FileNotFoundError:
            raise ModelError(f"{adapter_dir} is not a fedtune adapter directory (no {META_FILE})") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{path} is unreadable: {err}") from err


def save_adapter(model: PeftModel, arrays: Arrays, out_dir: Path, *, meta: AdapterMeta) -> Path:
    """Write ``arrays`` in PEFT format (adapter_config.json + adapter_model.safetensors) and ``fedtune.json``.

    Nothing written names a path of this machine: the base model is named by ``meta.base``. PEFT's
    template README is removed; ``fedtune.common.model_card.write_model_card`` writes the real card.
    """
    load_arrays(model, arrays)
    config = model.peft_config["default"]
    config.base_model_name_or_path = meta.base.name
    config.revision = meta.base.revision
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)  # embeddings stay frozen, never saved
    (out_dir / "README.md").unlink(missing_ok=True)
    (out_dir / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return out_dir


@dataclass(frozen=True)
class LoadedAdapter:
    """A trained sentence classifier, ready to predict (``predict_proba``)."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    meta: AdapterMeta

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities [N, len(labels)], columns in ``meta.labels`` order."""
        return probabilities(self.model, self.tokenizer, list(texts), max_len=self.meta.max_seq_len,
                             batch_size=batch_size)


def load_adapter(adapter_dir: str | Path, base: str | Path | None = None) -> LoadedAdapter:
    """Load a saved adapter on its base model, from any folder on any machine.

    ``base`` is the base model's directory; by default it is resolved from ``fedtune.json``: the
    embedded all-MiniLM-L6-v2 copy when installed, else the Hub id at its recorded revision (or the
    local Hugging Face cache), else a directory of the recorded name under the current directory.
    """
    adapter_dir = Path(adapter_dir)
    meta = AdapterMeta.read(adapter_dir)
    base_model = load_base(resolve_base(meta.base, base))
    check_base(meta.base, base_model)
    try:
        model = PeftModel.from_pretrained(build_classifier(base_model, len(meta.labels)), str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"could not load the adapter in {adapter_dir} on {meta.base.name}: {err}") from err
    model.eval()
    return LoadedAdapter(model, base_model.tokenizer, meta)


def export_sentence_transformer(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Export the adapter merged into its base as a stock ``sentence-transformers`` model.

    The result is Transformer -> mean pooling -> Dense (identity activation): exactly this classifier,
    so ``SentenceTransformer(out_dir).encode(texts)`` returns its logits (softmax them for probabilities,
    columns in ``labels.json`` order) with no fedtune import. The adapter's model card is kept beside it
    as ``fedtune-model-card.md`` (merging is post-processing: the privacy statement still holds).
    """
    import sentence_transformers.models as models
    from sentence_transformers import SentenceTransformer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    loaded = load_adapter(adapter_dir, base)
    merged = loaded.model.merge_and_unload()  # LoRA folded into the encoder's weights
    with tempfile.TemporaryDirectory() as encoder_dir:
        merged.encoder.save_pretrained(encoder_dir)
        loaded.tokenizer.save_pretrained(encoder_dir)
        transformer = models.Transformer(encoder_dir, max_seq_length=loaded.meta.max_seq_len)
        pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
        dense = models.Dense(merged.head.in_features, merged.head.out_features, bias=True,
                             activation_function=torch.nn.Identity())
        dense.linear.load_state_dict(merged.head.state_dict())
        SentenceTransformer(modules=[transformer, pooling, dense], device="cpu").save(str(out_dir))
    (out_dir / "labels.json").write_text(json.dumps(loaded.meta.labels) + "\n")
    if (adapter_dir / "README.md").is_file():
        shutil.copyfile(adapter_dir / "README.md", out_dir / "fedtune-model-card.md")
    return out_dir
