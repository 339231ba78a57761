"""The plain Flower app that ``fedtune.sim.deploy_bench`` deploys beside fedtune, to see Flower's own round cost.

:func:`write_app_dir` copies this file as it is into the app directory (``plain_app.py``), which is shipped in
the FAB, so it imports only Flower, numpy and the standard library, never fedtune. The ClientApp does no work:
it echoes the arrays (the size of fedtune's LoRA + head for the tiny BERT) with ``num-examples``. The ServerApp
runs Flower's FedAvg over every node and appends ``{"round": r, "elapsed-s": s}`` to ``run_config["timestamps"]``
after round r's evaluation (r = 0 is the initial evaluation), the same lines and clock as fedtune's
``metrics.jsonl``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

# LoRA r=8 on query and value in 2 layers of hidden 32 (A: 8 x 32, B: 32 x 8), and a 2-class linear head.
SHAPES = {**{f"lora-{t}-{i}-{ab}": (8, 32) if ab == "a" else (32, 8) for t in ("q", "v") for i in range(2)
             for ab in "ab"}, "head-weight": (2, 32), "head-bias": (2,)}
NUM_EXAMPLES = 60  # rows a node holds in the fedtune half of the benchmark

PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "plain-bench"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune-bench"

[tool.flwr.app.components]
serverapp = "plain_app:server"
clientapp = "plain_app:client"

[tool.flwr.app.config]
num-server-rounds = {rounds}
nodes = {nodes}
timestamps = {timestamps}
"""

server = ServerApp()
client = ClientApp()


def write_app_dir(app_dir: Path, *, nodes: int, rounds: int, timestamps: Path) -> Path:
    """The app for ``flwr run APP_DIR``: a pyproject and this file; round lines will go to ``timestamps``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, app_dir / "plain_app.py")
    config = PYPROJECT.format(rounds=rounds, nodes=nodes, timestamps=json.dumps(str(timestamps)))
    (app_dir / "pyproject.toml").write_text(config)
    return app_dir


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({name: Array(rng.standard_normal(shape).astype(np.float32)) for name, shape in SHAPES.items()})


def stamp(path: Path, started: float, server_round: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"round": server_round, "elapsed-s": round(time.monotonic() - started, 3)}) + "\n")


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes, out = int(context.run_config["nodes"]), Path(str(context.run_config["timestamps"]))
    started = time.monotonic()

    def evaluate(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        stamp(out, started, server_round)
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes, min_evaluate_nodes=nodes,
                      min_available_nodes=nodes)
    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=int(context.run_config["num-server-rounds"]),
                   evaluate_fn=evaluate)


@client.train()
def train(msg: Message, _context: Context) -> Message:
    arrays = msg.content.array_records["arrays"]
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, _context: Context) -> Message:
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES, "loss": 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
