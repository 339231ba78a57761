"""Secure aggregation's cost and error, measured side by side in one run (docs/secure-aggregation.md).

    python -m fedtune.sim.secure_bench [--nodes 5] [--steps 8] [--runs 1] [--out results/secure-bench]

1. Quantisation error on a real round: ``--nodes`` nodes each run one round of the main job's DP-SGD (embedded
   MiniLM, Rotten Tomatoes, their own slice of the pool) from the same global adapter; their updates are summed
   exactly as a secure round sums them (the node's grid encoding, then Flower's own SecAgg+ quantisation,
   modular sum and dequantisation) and compared with plain FedAvg of the same updates (equal weights, as
   the secure sum weighs): the relative error of the aggregate, its largest coordinate error, and the
   largest |coordinate| of an update against the range. With client-dp it also reports the noise's norm.
2. Cost: the main job (``fedtune-sim`` defaults) without and with ``--secure-aggregation``, one after the
   other, ``--runs`` times each: seconds per round, bytes the server received per round, held-out accuracy.

Writes ``OUT/secure-bench.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedtune.client.randomness import RoundSeeds
from fedtune.client.secure_aggregation import encode
from fedtune.client.trainer import DpParams, train
from fedtune.common.models.adapter import load_arrays, to_arrays
from fedtune.common.models.base import load_base
from fedtune.common.models.device import pick_device
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.tasks.classify.task import CLASSIFY
from fedtune.common.wire.contract import RoundRequest
from fedtune.common.wire.secure_sum import MODULUS, flatten, step, summed_names, target_range, value_range
from fedtune.server.results import read_rounds
from fedtune.sim.bench import corpus

SIGMA = 0.76  # the main job's planned noise multiplier (docs/benchmarks.md)


def flower_sum(vectors: list[np.ndarray], c: float, target: int) -> np.ndarray:
    """The aggregate SecAgg+ computes from the nodes' float vectors: the mod's quantisation (weight 1), the
    modular sum (the masks cancel in it) and the workflow's dequantisation, with Flower's own functions."""
    total: list[np.ndarray] | None = None
    for v in vectors:
        q = [a.astype(np.int64) for a in factor_combine(target, quantize([v], c, target))]
        total = q if total is None else parameters_addition(total, q)
    assert total is not None
    ratio, recon = factor_extract(parameters_mod(total, MODULUS))
    return (dequantize(recon, c, target)[0] - (len(vectors) - 1) * c) * (target / ratio)


def _node_updates(settings: RunSettings, nodes: int, steps: int) -> tuple[dict, list[dict]]:
    """The global adapter and each node's trained adapter after one DP-SGD round on its own slice."""
    device, model_path = pick_device(), settings.model.model_path
    base = load_base(model_path)
    torch.manual_seed(0)
    global_arrays = to_arrays(build_model(base, 2, settings.lora, device))
    batch = settings.plan.batch_size
    ids, mask, labels = corpus(nodes * batch * steps, model_path, settings.model.max_seq_len)
    updates = []
    for i in range(nodes):
        part = slice(i * batch * steps, (i + 1) * batch * steps)
        model = build_model(base, 2, settings.lora, device)
        load_arrays(model, global_arrays)
        data = {"input_ids": ids[part], "attention_mask": mask[part], "labels": labels[part]}
        plan = settings.plan
        train(model, data, steps=steps, batch_size=batch, learning_rate=plan.learning_rate,
              lora_lr_scale=plan.lora_lr_scale, optimizer=plan.optimizer, dp=DpParams(SIGMA, 1.0), device=device,
              seeds=RoundSeeds.secret(), task=CLASSIFY)
        updates.append(to_arrays(model))
    return global_arrays, updates


def quantisation_error(settings: RunSettings, *, nodes: int, steps: int) -> dict[str, Any]:
    """Secure sum against plain FedAvg of the same real updates (see the module's docstring)."""
    reference, updates = _node_updates(settings, nodes, steps)
    names = summed_names(reference)
    request = RoundRequest(1, "bench", 0, ("neg", "pos"), settings.model, settings.lora, settings.plan,
                           settings.privacy, settings.aggregation)
    c, target = value_range(settings.aggregation, settings.plan, settings.privacy), target_range(nodes)
    encoded = [encode(u, reference, names, request, threshold=nodes, target=target) for u in updates]
    secure = flower_sum([v for v, _ in encoded], c, target)
    deltas = [flatten(u, names) - flatten(reference, names) for u in updates]
    plain = np.mean(deltas, axis=0)
    err = secure - plain
    # Under client-dp the difference is the clipping and the client-level noise, not quantisation.
    key = "relative-deviation-clip-and-noise" if settings.aggregation.client_dp else "relative-error"
    return {"nodes": nodes, "coordinates": int(plain.size), "value-range": c, "step": step(c, target),
            "update-norm": float(np.linalg.norm(plain)), key: float(np.linalg.norm(err) / np.linalg.norm(plain)),
            "max-coordinate-error": float(np.max(np.abs(err))),
            "max-update-coordinate": float(max(np.max(np.abs(d)) for d in deltas)),
            "clamped": int(sum(n for _, n in encoded)), "client-dp": settings.aggregation.client_dp}


def _federation(out: Path, secure: bool) -> dict[str, Any]:
    from fedtune.sim.cli import main as sim_main

    started = time.perf_counter()
    code = sim_main(["--out", str(out), "--overwrite", *(["--secure-aggregation"] if secure else [])])
    wall = time.perf_counter() - started
    lines = read_rounds(out)
    if code != 0 or len(lines) < 2:
        return {"secure": secure, "exit": code, "results": str(out)}
    elapsed = [float(x.get("elapsed-s", 0.0)) for x in lines]
    received = [int((x.get("secure-aggregation") or {}).get("bytes-received", x.get("bytes-received", 0)))
                for x in lines[1:]]
    return {"secure": secure, "exit": code, "wall-s": round(wall, 1), "accuracy": float(lines[-1]["accuracy"]),
            "seconds-per-round": [round(b - a, 1) for a, b in zip(elapsed, elapsed[1:], strict=False)],
            "bytes-received-per-round": received, "results": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.sim.secure_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="DP-SGD steps of each node's real round")
    p.add_argument("--runs", type=int, default=1, help="main jobs per mode (0: quantisation error only)")
    p.add_argument("--out", type=Path, default=Path("results/secure-bench"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = RunSettings.from_config({"max-seq-len": 48, "secure-aggregation": "true"})
    client_dp = RunSettings.from_config({"max-seq-len": 48, "secure-aggregation": "true", "client-dp": "true"})
    result: dict[str, Any] = {"federations": []}
    path = args.out / "secure-bench.json"

    def save() -> None:  # after every part: a long bench keeps what it measured
        path.write_text(json.dumps(result, indent=2) + "\n")

    result["quantisation"] = quantisation_error(base, nodes=args.nodes, steps=args.steps)
    save()
    result["quantisation-client-dp"] = quantisation_error(client_dp, nodes=args.nodes, steps=args.steps)
    save()
    for i in range(args.runs):
        for secure in (False, True):
            result["federations"].append(_federation(args.out / f"{'secure' if secure else 'plain'}-{i}", secure))
            save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
