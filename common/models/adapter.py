"""Adapter tensors on the wire and on disk.

Only trainable tensors travel (LoRA factors and the task's head), as a Flower
``ArrayRecord`` keyed by PEFT's adapter state-dict names; the frozen base model
never leaves a node. On disk the final adapter is PEFT's own format, so
``PeftModel.from_pretrained(model, dir)`` loads it, plus ``fedtune.json`` (task, base model by Hub id or
directory name, labels, sequence length) from which the model is rebuilt anywhere (for classify:
``fedtune.common.tasks.classify.adapter.load_adapter``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.common.errors import ModelError
from fedtune.common.models.base import BaseModelRef
from fedtune.common.tasks import DEFAULT_TASK, get_task
from fedtune.common.wire.arrays import Arrays, check_arrays


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """Trainable adapter tensors (detached, on CPU), in a stable order."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in sorted(state.items()))


def to_arrays(model: PeftModel) -> Arrays:
    return {k: v.numpy() for k, v in adapter_state(model).items()}


def to_record(model: PeftModel) -> ArrayRecord:
    return ArrayRecord(adapter_state(model))


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


@dataclass(frozen=True)
class AdapterMeta:
    """What ``fedtune.json`` beside a saved adapter says: enough to rebuild the task's model anywhere."""

    base: BaseModelRef
    labels: list[str]
    max_seq_len: int
    task: str = DEFAULT_TASK  # the `task` setting: classify, ner or sft

    def to_json(self) -> dict[str, Any]:
        task = get_task(self.task)
        out = {"format": META_FORMAT, "task": task.pipeline_tag, "fedtune-task": self.task,
               "base_model": self.base.to_json(), "labels": self.labels, "max_seq_len": self.max_seq_len}
        return out | dict(task.adapter_fields)

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterMeta:
        path = adapter_dir / META_FILE
        try:
            raw = json.loads(path.read_text())
            base = raw["base_model"]
            return cls(BaseModelRef.from_json(base if isinstance(base, dict) else {"name": base, "source": "local"}),
                       [str(x) for x in raw["labels"]], int(raw.get("max_seq_len") or 128),
                       str(raw.get("fedtune-task", DEFAULT_TASK)))  # written before tasks existed: a classifier
        except FileNotFoundError:
            raise ModelError(f"{adapter_dir} is not a fedtune adapter directory (no {META_FILE})") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{path} is unreadable: {err}") from err


def save_adapter(model: PeftModel, arrays: Arrays, out_dir: Path, *, meta: AdapterMeta) -> Path:
    """Write ``arrays`` in PEFT format (adapter_config.json + adapter_model.safetensors) and ``fedtune.json``.

    Nothing written names a path of this machine: the base model is named by ``meta.base``. PEFT's
    template README is removed; ``fedtune.common.models.card.write_model_card`` writes the real card.
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
