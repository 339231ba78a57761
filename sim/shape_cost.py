"""What the node policy's ``fixed-shape`` costs: DP training throughput with and without it, side by side.

Under ``fixed-shape`` every part of a Poisson batch is padded to max-seq-len (``client/trainer.py``), so the
shapes the model computes on, and with them a round's time and memory, depend on the batch sizes and the
settings only, never on the lengths of the rows drawn. The price is the padding dynamic padding would skip;
this measures it on the main job's corpus, as ``fedtune.sim.bench`` measures the other loops.
"""

from __future__ import annotations

import statistics
from typing import Any

from fedtune.client.trainer import PART_SIZE
from fedtune.common.models.base import load_base
from fedtune.common.models.device import autocast_dtype, pick_device
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.classify.model import frozen_prefix, lower_states
from fedtune.sim.bench import NAIVE_LORA, corpus, dp_rate, machine


def fixed_shape_cost(model_path: str, *, examples: int, batch: int, steps: int, max_len: int, top: LoraSettings,
                     repeats: int = 3) -> dict[str, Any]:
    """The default loop without and with ``fixed-shape``, on the same examples, back to back ``repeats`` times
    (a change of the machine's load hits both of a pair): medians of the rates and of the pairs' ratios, for LoRA
    in every layer and for the top layers trained from the frozen layers' cached states."""
    device = pick_device()
    ids, mask, labels = corpus(examples, model_path, max_len)
    started = machine()
    encoder = load_base(model_path).encoder
    states = lower_states(encoder, ids, mask, frozen_prefix(encoder, top))
    configs = {"": (NAIVE_LORA, (ids, mask, labels)),
               "cached-": (top, {"hidden_states": states, "attention_mask": mask, "labels": labels})}
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for prefix, (lora, data) in configs.items():
            for fixed in (False, True):
                runs.setdefault(f"{prefix}{'fixed-shape' if fixed else 'default'}", []).append(dp_rate(
                    model_path, lora, data, batch=batch, steps=steps, device=device,
                    fixed_shape=fixed))
    out: dict[str, Any] = {
        "examples": len(ids), "batch": batch, "steps": steps, "max-seq-len": max_len, "part-size": PART_SIZE,
        "repeats": repeats, "top-lora-layers": top.lora_layers,
        "precision": str(autocast_dtype(device) or "fp32").removeprefix("torch."),
        "mean-tokens": round(float(mask.sum(dim=1).float().mean()), 1), "date": started["date"],
        "load-1min-start": started["load-1min"], "load-1min-end": machine()["load-1min"],
    }
    for name, rates in runs.items():
        out[f"{name}-ex-per-s"] = round(statistics.median(rates), 1)
        out[f"{name}-runs"] = [round(r, 1) for r in rates]
    for prefix in configs:
        ratios = [f / d for f, d in zip(runs[f"{prefix}fixed-shape"], runs[f"{prefix}default"], strict=True)]
        out[f"{prefix}fixed-over-default"] = round(statistics.median(ratios), 2)
        out[f"{prefix}fixed-over-default-runs"] = [round(r, 2) for r in ratios]
    return out
