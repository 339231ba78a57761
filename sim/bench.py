"""Benchmarks of fedtune's DP training, measured side by side in one run, written to docs/benchmarks.md.

    python -m fedtune.sim.bench [--examples 512] [--steps 3] [--scale] [--fixed-shape-only] [--out docs/benchmarks.md]

1. Throughput: examples/s of DP-SGD (Opacus, the job's batch size) on Rotten Tomatoes snippets with the
   embedded MiniLM, for the naive loop (every batch padded to max-seq-len, fp32, LoRA in every layer) against
   per-batch padding, length-sorted parts of each batch, the default loop (parts under the precision the
   node picks: bf16 autocast on CPUs with native bf16), and LoRA in the top layers trained from the frozen
   layers' cached states.
2. Per-round overhead: one node's round cut into its parts (request and reply (de)serialisation, ledger
   charge, model build and adapter load, Opacus wrapping, forward/backward, update extraction) and the
   server's per-round work (aggregation, held-out evaluation).
3. Fixed shape: the default loop against the same loop with the node policy's ``fixed-shape`` (every part
   padded to max-seq-len, so a round's time does not depend on the lengths of the rows drawn), interleaved in
   one process; ``--fixed-shape-only`` runs this part alone and merges it into the existing figures.
4. With ``--scale``: federations of 100 clients (MiniLM) and 1,000 clients (tiny BERT) through Flower's
   simulation engine (``fedtune.sim.scale``), with time per round, peak memory and bytes per client.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import PART_SIZE, DpParams, Parts, TrainResult, prepare_loop, privatize, run_loop, train
from fedtune.common import runtime
from fedtune.common.data.table import federation_split
from fedtune.common.models.adapter import load_arrays, to_arrays
from fedtune.common.models.base import encode, load_base
from fedtune.common.models.device import autocast_dtype, pick_device
from fedtune.common.settings import DataSettings, LoraSettings, RunSettings
from fedtune.common.tasks.classify.model import build_model, frozen_prefix, lower_states
from fedtune.common.tasks.classify.task import CLASSIFY
from fedtune.common.wire.arrays import arrays_to_record, record_to_arrays
from fedtune.common.wire.contract import RoundRequest
from fedtune.server.results import read_rounds

NAIVE_LORA = LoraSettings(lora_layers="")  # LoRA in every layer: the loop before caching
TRAIN_PART = "DP training (forward/backward/step)"
LEDGER_PART = "ledger charges (fsync'd; mean over the job's rounds)"
SIGMA = 1.0  # a typical noise multiplier of the main job (the cost of DP does not depend on it)
# Loops no node runs: each Poisson batch whole at max-seq-len (naive: one part at full width, as fixed-shape
# computes it; the classifier's loss is the same either way) or padded to its own longest example.
NAIVE_PARTS, WHOLE_BATCH_PARTS = Parts(0, fixed_shape=True), Parts(0)


@functools.lru_cache(maxsize=1)
def _pool() -> Any:
    return federation_split(CLASSIFY.load_data(DataSettings()), 0.15, 42, 6000)[0]


def corpus(n: int, model_path: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` training snippets of the real corpus (the main job's training pool), padded to ``max_len``."""
    pool = _pool()
    part = pool.dataset.select(range(min(n, len(pool.dataset))))
    ids, mask = encode(load_base(model_path).tokenizer, part["text"], max_len)
    return ids, mask, torch.tensor(part["label"], dtype=torch.long)


def _precision(choice: str) -> AbstractContextManager[None]:
    """Run under ``FEDTUNE_PRECISION=choice`` (fp32, bf16 or auto)."""
    return runtime.overridden(runtime.PRECISION, choice)


def bench_train(model: Any, data: Any, *, steps: int, batch: int, device: torch.device, seeds: RoundSeeds,
                parts: Parts | None = None, fixed_shape: bool = False) -> TrainResult:
    """One DP training run of the classifier: a node's own loop (``train``) when ``parts`` is None, else the
    trainer's two halves (``prepare_loop``, ``run_loop``) with each Poisson batch cut as ``parts`` says."""
    kwargs: dict[str, Any] = dict(batch_size=batch, learning_rate=0.5, dp=DpParams(SIGMA, 1.0), device=device,
                                  seeds=seeds)
    if parts is None:
        return train(model, data, steps=steps, task=CLASSIFY, fixed_shape=fixed_shape, **kwargs)
    return run_loop(prepare_loop(model, data, **kwargs), CLASSIFY, steps=steps, device=device, parts=parts)


def dp_rate(model_path: str, lora: LoraSettings, data: Any, *, batch: int, steps: int, device: torch.device,
            precision: str = "auto", parts: Parts | None = None, fixed_shape: bool = False) -> float:
    """DP-SGD examples/s of :func:`bench_train` (after a warm-up round) for one configuration."""
    base = load_base(model_path)
    kwargs: dict[str, Any] = dict(batch=batch, device=device, parts=parts, fixed_shape=fixed_shape)
    with _precision(precision):
        bench_train(build_model(base, 2, lora, device), data, steps=1, seeds=RoundSeeds.insecure(0, 0, "warm"),
                    **kwargs)
        model = build_model(base, 2, lora, device)
        start = time.perf_counter()
        result = bench_train(model, data, steps=steps, seeds=RoundSeeds.insecure(0, 1, "bench"), **kwargs)
    return result.examples / (time.perf_counter() - start)


def throughput(model_path: str, *, examples: int, batch: int, steps: int, max_len: int, top: LoraSettings,
               rounds: int = 3) -> dict[str, Any]:
    """The training loops on the same examples, same device, one after the other."""
    device = pick_device()
    ids, mask, labels = corpus(examples, model_path, max_len)
    encoder = load_base(model_path).encoder
    cut = frozen_prefix(encoder, top)
    start = time.perf_counter()
    states = lower_states(encoder, ids, mask, cut)
    cache_s_per_example = (time.perf_counter() - start) / len(ids)
    plain = (ids, mask, labels)
    rate = functools.partial(dp_rate, model_path, batch=batch, steps=steps, device=device)
    naive = rate(NAIVE_LORA, plain, parts=NAIVE_PARTS, precision="fp32")
    padded = rate(NAIVE_LORA, plain, parts=WHOLE_BATCH_PARTS, precision="fp32")
    parts = rate(NAIVE_LORA, plain, precision="fp32")  # the node's own loop from here on
    default = rate(NAIVE_LORA, plain)
    cached = rate(top, {"hidden_states": states, "attention_mask": mask, "labels": labels})
    # Over a job a node computes its cache once and trains on each example `rounds` times (one epoch a round).
    amortised = rounds / (rounds / cached + cache_s_per_example)
    return {
        "examples": len(ids), "batch": batch, "steps": steps, "max-seq-len": max_len, "part-size": PART_SIZE,
        "precision": str(autocast_dtype(device) or "fp32").removeprefix("torch."),
        "mean-tokens": round(float(mask.sum(dim=1).float().mean()), 1), "top-lora-layers": top.lora_layers,
        "naive-ex-per-s": round(naive, 1), "dynamic-padding-ex-per-s": round(padded, 1),
        "sorted-parts-ex-per-s": round(parts, 1), "default-ex-per-s": round(default, 1),
        "top-layers-cached-ex-per-s": round(cached, 1), "cache-ex-per-s": round(1 / cache_s_per_example, 1),
        "top-layers-amortised-ex-per-s": round(amortised, 1),
        "dynamic-padding-over-naive": round(padded / naive, 2), "sorted-parts-over-naive": round(parts / naive, 2),
        "default-over-naive": round(default / naive, 2), "cached-over-naive": round(cached / naive, 2),
        "amortised-over-naive": round(amortised / naive, 2),
    }


class Clock:
    """Seconds spent in named parts of a round."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def _wire_roundtrip(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Arrays -> Flower ArrayRecord -> protobuf bytes -> back, as a message crosses the SuperLink."""
    from flwr.common.serde import array_record_from_proto, array_record_to_proto
    from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord

    blob = array_record_to_proto(arrays_to_record(arrays)).SerializeToString()
    proto = ProtoArrayRecord()
    proto.ParseFromString(blob)
    return record_to_arrays(array_record_from_proto(proto)), len(blob)


def node_round(model_path: str, data: Any, *, settings: RunSettings, steps: int,
               clock: Clock) -> tuple[int, dict[str, Any]]:
    """One node's round, part by part (the pieces ``client/round.py`` runs); returns the reply's bytes and
    what fp16 transport would change (:func:`half_precision_transport`)."""
    device = pick_device()
    base = load_base(model_path)
    request = _request(settings)
    global_arrays = to_arrays(build_model(base, 2, settings.lora, device))
    with clock.part("request (de)serialisation"):
        received, _ = _wire_roundtrip(global_arrays)
        request = RoundRequest.from_record(request.to_record())
    with clock.part("model build + adapter load"):
        model = build_model(base, 2, request.lora, device)
        load_arrays(model, received)
    with clock.part("Opacus wrapping"):
        private = privatize(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data["labels"]), batch_size=8),
                            DpParams(SIGMA, 1.0), torch.Generator())
        private.module._close()
    with clock.part(TRAIN_PART):
        plan = request.plan
        train(model, data, steps=steps, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
              lora_lr_scale=plan.lora_lr_scale, optimizer=plan.optimizer, dp=DpParams(SIGMA, 1.0), device=device,
              seeds=RoundSeeds.insecure(0, 1, "bench"), task=CLASSIFY)
    with clock.part("update extraction + reply serialisation"):
        sent = to_arrays(model)
        _, size = _wire_roundtrip(sent)
    return size, half_precision_transport(sent, received)


def half_precision_transport(sent: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> dict[str, Any]:
    """What fp16 on the wire would do to one node's DP update: the rounding error, relative to the size of
    the round's update, of sending the trained values in fp16 and of sending the update (values - global)."""
    def flat(arrays: Any) -> np.ndarray:
        return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])

    update = flat(sent[k] - received[k] for k in sent)
    values_error = flat(sent[k].astype(np.float16).astype(np.float32) - sent[k] for k in sent)
    update_error = flat((sent[k] - received[k]).astype(np.float16).astype(np.float32) - (sent[k] - received[k])
                        for k in sent)
    norm = float(np.linalg.norm(update)) or 1.0
    return {"fp32-bytes": int(sum(a.nbytes for a in sent.values())),
            "fp16-bytes": int(sum(a.astype(np.float16).nbytes for a in sent.values())),
            "values-error-over-update": round(float(np.linalg.norm(values_error)) / norm, 6),
            "update-error-over-update": round(float(np.linalg.norm(update_error)) / norm, 6)}


def _request(settings: RunSettings, server_round: int = 1) -> RoundRequest:
    return RoundRequest(server_round=server_round, run_key="bench", resumed_after_round=0, labels=("neg", "pos"),
                        model=settings.model, lora=settings.lora, plan=settings.plan, privacy=settings.privacy)


def ledger_charges(settings: RunSettings, *, examples: int, steps: int, nodes: int) -> tuple[float, float]:
    """Every node's ledger charge over the job's rounds, one after the other in one process as the
    simulation's actor runs them (accountant caches cold at the start): the mean per round, and one node's
    first round alone (its noise plan; what a deployed node pays once per run)."""
    from fedtune.client.round import NodePrivacy, RunRef, charge_round, plan_request
    from fedtune.common.privacy import accountant as accounting
    from fedtune.sim.nodes import default_policy

    for cached in (accounting._opacus_epsilon, accounting._dp_accounting_epsilon, accounting._rdp_upper_bound):
        cached.cache_clear()
    rounds, first = settings.plan.num_rounds, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        handles = [NodePrivacy.open(default_policy(settings, i), Path(tmp, str(i)), node=f"simulation:client-{i}")
                   for i in range(nodes)]
        start = time.perf_counter()
        for server_round in range(1, rounds + 1):
            request = replace(plan_request(_request(settings, server_round), examples), steps=steps)
            for node in handles:
                began = time.perf_counter()
                charge_round(node, request, run=RunRef("bench"), fingerprint="f")
                first = first or time.perf_counter() - began
        return (time.perf_counter() - start) / rounds, first


def overhead(model_path: str, *, examples: int, steps: int, lora: LoraSettings, nodes: int = 5,
             eval_examples: int = 1922) -> dict[str, Any]:
    """Shares of a round's time: every node's parts and the server's aggregation and held-out evaluation.

    ``lora`` is the job's LoRA configuration; with ``lora-layers`` set the node's lower-layer cache is
    counted too (its cost spread over the job's rounds).
    """
    from fedtune.common.tasks.classify.evaluation import evaluate
    from fedtune.server.aggregation import fedavg

    settings = RunSettings.from_config({"lora-layers": lora.lora_layers})
    ids, mask, labels = corpus(examples, model_path, settings.model.max_seq_len)
    cut = frozen_prefix(load_base(model_path).encoder, lora)
    clock = Clock()
    data: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if cut:
        with clock.part("lower-layer cache (once per node and job, shown per round)"):
            states = lower_states(load_base(model_path).encoder, ids, mask, cut)
        clock.parts["lower-layer cache (once per node and job, shown per round)"] /= settings.plan.num_rounds
        data = {"hidden_states": states, "attention_mask": mask, "labels": labels}
    reply_bytes, fp16 = node_round(model_path, data, settings=settings, steps=steps, clock=clock)
    node_parts = {k: v * nodes for k, v in clock.parts.items()}  # every node does the same work
    per_round, first_charge = ledger_charges(settings, examples=examples, steps=steps, nodes=nodes)
    node_parts = {LEDGER_PART: per_round, **node_parts}
    server = Clock()
    updates = [to_arrays(build_model(load_base(model_path), 2, lora, pick_device())) for _ in range(nodes)]
    with server.part("server aggregation"):
        fedavg([(u, float(examples)) for u in updates])
    model = build_model(load_base(model_path), 2, lora, pick_device())
    e_ids, e_mask, e_labels = corpus(eval_examples, model_path, settings.model.max_seq_len)
    with server.part("server held-out evaluation"):
        evaluate(model, e_ids, e_mask, e_labels, device=pick_device())
    parts = node_parts | server.parts
    total = sum(parts.values())
    compute = parts[TRAIN_PART] + parts["server held-out evaluation"]
    return {"nodes": nodes, "examples-per-node": examples, "steps": steps, "reply-bytes": reply_bytes,
            "lora-layers": lora.lora_layers, "parts-s": {k: round(v, 3) for k, v in parts.items()},
            "overhead-share": round((total - compute) / total, 4), "rounds": settings.plan.num_rounds,
            "first-charge-s": round(first_charge, 3), "fp16-transport": fp16,
            "node-first-round-share": round(first_charge / (first_charge + clock.parts[TRAIN_PART]), 4)}


def machine() -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": str(pick_device()), "load-1min": load,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main_job_row(results: Path, wall_s: float | None, load: float | None) -> dict[str, Any]:
    """A finished ``fedtune-sim`` run (its results directory) as a row: accuracy per round and time."""
    lines = read_rounds(results)
    settings = json.loads((results / "summary.json").read_text()).get("settings", {}) \
        if (results / "summary.json").is_file() else {}
    return {"results": results.name, "model": settings.get("model-path") or "all-MiniLM-L6-v2",
            "lora-layers": settings.get("lora-layers", ""),
            "accuracy": [round(float(x["accuracy"]), 4) for x in lines],
            "epsilon-max": lines[-1].get("epsilon-max"), "clients-trained": [len(x["clients"]) for x in lines[1:]],
            "bytes-per-client-round": max((int(c.get("bytes", 0)) for x in lines for c in x["clients"]), default=0),
            "run-s": lines[-1].get("elapsed-s"), "wall-s": wall_s, "load-1min": load}


def run(args: argparse.Namespace) -> dict[str, Any]:
    top = LoraSettings(lora_layers=args.top_layers)
    out: dict[str, Any] = {"machine": machine(), "model": args.model or "all-MiniLM-L6-v2 (embedded)"}
    out["throughput"] = throughput(args.model, examples=args.examples, batch=args.batch, steps=args.steps,
                                   max_len=args.seq, top=top)
    from fedtune.sim.shape_cost import fixed_shape_cost

    out["fixed-shape"] = fixed_shape_cost(args.model, examples=args.examples, batch=args.batch, steps=args.steps,
                                          max_len=args.seq, top=top)
    node_examples = args.node_examples or args.examples
    out["overhead"] = overhead(args.model, examples=node_examples, steps=math.ceil(node_examples / args.batch),
                               lora=LoraSettings(lora_layers=args.round_layers), eval_examples=args.eval_examples)
    if args.scale:
        from fedtune.sim.scale import scale_rows

        out["scale"] = scale_rows(Path(args.out).parent)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="local model directory (default: embedded MiniLM)")
    p.add_argument("--examples", type=int, default=512, help="training snippets per configuration")
    p.add_argument("--batch", type=int, default=128, help="expected Poisson batch size (the job's batch-size)")
    p.add_argument("--seq", type=int, default=48, help="max-seq-len")
    p.add_argument("--steps", type=int, default=3, help="timed DP steps per configuration")
    p.add_argument("--top-layers", default="4,5", help="lora-layers of the cached configuration")
    p.add_argument("--eval-examples", type=int, default=1922, help="held-out examples the server evaluates")
    p.add_argument("--node-examples", type=int, default=1080,
                   help="training examples per node in the round breakdown (the main job: 5,396 over 5 nodes); "
                        "the node trains one epoch of them")
    p.add_argument("--round-layers", default="", help="lora-layers of the round breakdown (default: every layer, "
                   "as the main job)")
    p.add_argument("--scale", action="store_true", help="also run the 100- and 1,000-client federations")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--scale-rows", default="", metavar="CLIENTS:MODEL:ROUNDS,...",
                   help="run only these federations (model minilm or tiny; e.g. 100:minilm:2,1000:tiny:2) and "
                        "merge them into the scale table, replacing rows of the same clients and model")
    p.add_argument("--fixed-shape-only", action="store_true",
                   help="run only the fixed-shape comparison (the default loop with and without the node policy's "
                        "fixed-shape) and merge it into the existing figures, keeping every other row")
    p.add_argument("--record-run", nargs=3, metavar=("RESULTS_DIR", "WALL_S", "LOAD"),
                   help="add a finished main-job run (make run) to the main-job table and re-render, nothing else")
    p.add_argument("--record-deploy", type=Path, metavar="JSON",
                   help="take the deployed-round comparison from a `python -m fedtune.sim.deploy_bench` result and "
                        "re-render, nothing else")
    return p


def main(argv: list[str] | None = None, *, render: Callable[[dict[str, Any]], str] | None = None) -> int:
    args = parser().parse_args(argv)
    from fedtune.sim.bench_report import to_markdown

    json_path = args.out.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.scale_rows:
        from fedtune.sim.scale import merge_scale_rows, scale_specs

        result = previous
        result["scale"] = merge_scale_rows(previous.get("scale"), scale_specs(args.scale_rows), args.out.parent)
    elif args.fixed_shape_only:
        from fedtune.sim.shape_cost import fixed_shape_cost

        result = previous
        result["fixed-shape"] = fixed_shape_cost(args.model, examples=args.examples, batch=args.batch,
                                                 steps=args.steps, max_len=args.seq,
                                                 top=LoraSettings(lora_layers=args.top_layers))
    elif args.record_deploy:
        result = previous
        result["deployed-round"] = json.loads(args.record_deploy.read_text())
    elif args.record_run:
        result = previous
        row = main_job_row(Path(args.record_run[0]), float(args.record_run[1]), float(args.record_run[2]))
        result["main-job"] = [*previous.get("main-job", []), row]
    else:
        result = run(args)
        for kept in ("scale", "main-job", "deployed-round"):  # figures measured by other runs stay until re-measured
            if kept in previous and kept not in result:
                result[kept] = previous[kept]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text((render or to_markdown)(result))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
