"""Scale rows for ``make bench --scale``: whole federations through ``fedtune-sim`` (Flower's simulation engine).

Each row runs ``fedtune-sim`` as a child process and reports wall time per round (from the server's
``metrics.jsonl``), the peak resident memory of the whole process tree (fedtune-sim, SuperLink, Ray and its
workers; sampled every half second) and the bytes each client's reply carried per round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fedtune.server.results import read_rounds

PLOT = "benchmarks-scale.png"
MAX_TRAIN_EXAMPLES = 6000  # the job's default cap on the training pool, split over the clients


def repeated_corpus(path: Path, rows: int) -> Path:
    """The default corpus (Rotten Tomatoes) as a CSV, repeated until it holds at least ``rows`` examples: enough for
    a federation of more clients than it has examples (the scale rows measure overhead, not accuracy)."""
    import math

    import pandas as pd

    from fedtune.common.settings import DataSettings
    from fedtune.common.tasks import get_task

    data = get_task("classify").load_data(DataSettings())
    frame = pd.DataFrame({"text": data.dataset["text"], "label": [data.label_names[i] for i in data.dataset["label"]]})
    pd.concat([frame] * math.ceil(rows / len(frame)), ignore_index=True).to_csv(path, index=False)
    return path


def round_timeout(clients: int) -> int:
    """The default 600 s, or 0.25 s per client for larger federations (a round of 10,000 clients then has time)."""
    return max(600, clients // 4)


@dataclass(frozen=True)
class ScaleSpec:
    clients: int
    model: str  # "minilm" (embedded) or "tiny" (a 2-layer BERT, hidden 32, built here)
    rounds: int = 2


SPECS = (ScaleSpec(5, "minilm"), ScaleSpec(100, "minilm"), ScaleSpec(100, "tiny"), ScaleSpec(1000, "tiny"))


def tiny_model(path: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved to ``path``."""
    from transformers import BertConfig, BertModel

    from fedtune.common.models.base import load_base

    tokenizer = load_base("").tokenizer
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class PeakMemory:
    """Peak summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _full_model_bytes(model_path: str) -> int:
    from fedtune.common.models.base import load_base

    return sum(p.numel() * p.element_size() for p in load_base(model_path).encoder.parameters())


def run_row(spec: ScaleSpec, work: Path) -> dict[str, Any]:
    """One federation; its figures as a row."""
    model_path = str(tiny_model(work / "tiny")) if spec.model == "tiny" else ""
    out = work / f"run-{spec.clients}-{spec.model}"
    cmd = [sys.executable, "-m", "fedtune.sim.cli", "--clients", str(spec.clients), "--rounds", str(spec.rounds),
           "--partitioner", "iid", "--out", str(out), "--set", "min-clients=2",
           "--set", f"round-timeout={round_timeout(spec.clients)}"]
    if spec.clients > MAX_TRAIN_EXAMPLES:  # at least two rows a node: the corpus, repeated, uncapped
        cmd += ["--set", f"dataset={repeated_corpus(work / 'corpus.csv', 3 * spec.clients)}",
                "--set", "max-train-examples=0"]
    if model_path:
        cmd += ["--model", model_path, "--set", "lora-layers="]  # two layers, LoRA in both
    load = os.getloadavg()[0]
    start = time.monotonic()
    with open(work / f"run-{spec.clients}-{spec.model}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        memory = PeakMemory(proc.pid)
        code = proc.wait()
        peak = memory.stop()
    wall = time.monotonic() - start
    if code != 0:
        return {"clients": spec.clients, "model": spec.model, "failed": code, "log": str(log.name)}
    lines = read_rounds(out)
    ends = [float(x["elapsed-s"]) for x in lines]
    per_round = [b - a for a, b in zip(ends, ends[1:], strict=False)] or ends
    replies = [int(c["bytes"]) for x in lines for c in x.get("clients", []) if c.get("bytes")]
    examples = [int(c["num-examples"]) for c in lines[-1].get("clients", []) if c.get("status") == "trained"]
    return {
        "clients": spec.clients, "model": "all-MiniLM-L6-v2" if spec.model == "minilm" else "tiny BERT (2x32)",
        "rounds": spec.rounds, "examples-per-client": round(sum(examples) / len(examples), 1) if examples else
        MAX_TRAIN_EXAMPLES // spec.clients,
        "s-per-round": round(sum(per_round) / len(per_round), 1), "s-per-round-each": [round(s, 1) for s in per_round],
        "s-per-client-round": round(sum(per_round) / len(per_round) / spec.clients, 4),
        "round-timeout": round_timeout(spec.clients),
        "wall-s": round(wall, 1), "peak-rss-gib": round(peak / 2**30, 2),
        "bytes-per-client-round": int(sum(replies) / len(replies)) if replies else 0,
        "full-model-bytes": _full_model_bytes(model_path), "load-1min": round(load, 1),
        "final-accuracy": lines[-1].get("accuracy"),
        "trained-last-round": sum(c.get("status") == "trained" for c in lines[-1].get("clients", [])),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["clients"])
        ax.plot([r["clients"] for r in mine], [r["s-per-round"] for r in mine], marker="o", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("clients (all sampled every round)")
    ax.set_ylabel("wall time per round (s)")
    ax.set_title("fedtune-sim on one machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scale_rows(out_dir: Path, specs: tuple[ScaleSpec, ...] = SPECS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-") as tmp:
        rows = [run_row(spec, Path(tmp)) for spec in specs]
    done = [r for r in rows if "failed" not in r]
    if done:
        plot(done, out_dir / PLOT)
    return {"rows": done, "failed": [r for r in rows if "failed" in r], "plot": PLOT if done else None}


def scale_specs(text: str) -> tuple[ScaleSpec, ...]:
    """``fedtune-bench --scale-rows``: CLIENTS:MODEL[:ROUNDS],... (ConfigError naming a bad item)."""
    from fedtune.common.errors import ConfigError

    specs = []
    for item in text.split(","):
        clients, model, rounds = ([*item.strip().split(":"), "2"])[:3]
        if not clients.isdigit() or model not in ("minilm", "tiny") or not rounds.isdigit():
            raise ConfigError(f"--scale-rows: {item!r} is not CLIENTS:MODEL[:ROUNDS] with MODEL minilm or tiny")
        specs.append(ScaleSpec(int(clients), model, int(rounds)))
    return tuple(specs)


def merge_scale_rows(previous: dict[str, Any] | None, specs: tuple[ScaleSpec, ...], out_dir: Path) -> dict[str, Any]:
    """``specs`` run now; the previous table's other rows kept; the plot redrawn from all of them."""
    new = scale_rows(out_dir, specs)
    names = {(r["clients"], r["model"]) for r in new["rows"]}
    old = {(r["clients"], r["model"]): r for r in (previous or {}).get("rows", [])}
    for row in new["rows"]:  # the figure it replaces stays beside it, until that row is measured again
        if (was := old.get((row["clients"], row["model"]))) is not None:
            row["was-s-per-round"] = was["s-per-round"]
    rows = [r for r in old.values() if (r["clients"], r["model"]) not in names] + new["rows"]
    rows.sort(key=lambda r: (r["model"], r["clients"]))
    if rows:
        plot(rows, out_dir / PLOT)
    return {"rows": rows, "failed": new["failed"], "plot": PLOT if rows else None}


if __name__ == "__main__":  # python -m fedtune.sim.scale CLIENTS MODEL ROUNDS [WORK_DIR] -> one row as JSON
    work = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_row(ScaleSpec(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])), work)))
