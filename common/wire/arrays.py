"""Adapter tensors on the wire: ``dict[str, np.ndarray]`` <-> Flower ``ArrayRecord``, and the checks every
tensor that crosses it meets (names, shapes, finite after the cast, bounded).

Only trainable tensors travel (LoRA factors and the head), keyed by PEFT's adapter state-dict names; the frozen
base model never leaves a node.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord

Arrays = dict[str, np.ndarray]
# The largest absolute value an adapter tensor may hold, on the wire in either direction. Trained LoRA factors and
# heads stay orders of magnitude below it; a value beyond it can only be an attempt to overflow a node's forward
# pass (the loss of a chosen row becomes inf, and whether training then fails would tell the sender whether that
# row was sampled) or to plant weights that dominate everyone's next round.
MAX_ADAPTER_VALUE = 1e4


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
