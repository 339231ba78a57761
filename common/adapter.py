"""Adapter tensors on the wire and on disk.

Only trainable tensors travel (LoRA factors and the classifier head), as a Flower
``ArrayRecord`` keyed by PEFT's adapter state-dict names; the frozen base model
never leaves a node. On disk the final adapter is PEFT's own format, so
``PeftModel.from_pretrained(base, dir)`` loads it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.common.errors import ModelError

Arrays = dict[str, np.ndarray]


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


def check_arrays(arrays: Arrays, reference: Arrays) -> list[str]:
    """Problems that make ``arrays`` unusable as an update of ``reference`` (names, shapes, NaN/inf)."""
    problems = []
    if missing := sorted(set(reference) - set(arrays)):
        problems.append(f"missing tensors: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra := sorted(set(arrays) - set(reference)):
        problems.append(f"unexpected tensors: {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name in sorted(set(arrays) & set(reference)):
        if arrays[name].shape != reference[name].shape:
            problems.append(f"{name}: shape {arrays[name].shape}, expected {reference[name].shape}")
        elif not np.all(np.isfinite(arrays[name])):
            problems.append(f"{name}: contains NaN or inf")
    return problems


def load_arrays(model: PeftModel, arrays: Arrays) -> None:
    """Set the model's adapter tensors; every expected tensor must be present with its shape."""
    if problems := check_arrays(arrays, to_arrays(model)):
        raise ModelError(["adapter does not fit the model:", *problems])
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    set_peft_model_state_dict(model, state)


def save_adapter(model: PeftModel, arrays: Arrays, out_dir: Path, *, base_path: str,
                 label_names: list[str]) -> Path:
    """Write ``arrays`` in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    load_arrays(model, arrays)
    model.peft_config["default"].base_model_name_or_path = base_path
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    (out_dir / "fedtune.json").write_text(json.dumps({
        "base_model": base_path,
        "labels": label_names,
        "head": "masked mean pooling -> linear (fedtune.common.model.SentenceClassifier)",
    }, indent=2) + "\n")
    return out_dir
