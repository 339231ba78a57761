"""The fedtune ClientApp (Flower Message API): local DP-SGD training and evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client.node_data import NodeData, load_node_data
from fedtune.client.policy import NodePolicy, load_policy, simulation_default
from fedtune.client.round import NodePrivacy, RunRef, seed_for, train_round
from fedtune.client.sim_nodes import SimulationNodes
from fedtune.common.adapter import arrays_to_record, load_arrays, record_to_arrays
from fedtune.common.device import pick_device
from fedtune.common.errors import ConfigError
from fedtune.common.evaluation import evaluate
from fedtune.common.model import build_model, load_base
from fedtune.common.settings import RunSettings

log = logging.getLogger("fedtune.client")
app = ClientApp()


def _settings(msg: Message, context: Context) -> RunSettings:
    """Run settings, with the server's per-round plan (ConfigRecord) over the run config."""
    merged = dict(context.run_config)
    config = msg.content.config_records.get("config")
    if config is not None:
        merged |= {k: v for k, v in config.items() if k in merged}
    return RunSettings.from_config(merged)


def _node(context: Context, settings: RunSettings) -> tuple[NodeData, Path, int]:
    """This node's data, state directory and a stable integer key."""
    cfg = context.node_config
    data_path = str(cfg["data-path"]) if "data-path" in cfg else None
    pid = int(cfg["partition-id"]) if "partition-id" in cfg else None
    nparts = int(cfg["num-partitions"]) if "num-partitions" in cfg else None
    data = load_node_data(settings, pid, nparts, data_path)
    if "state-dir" in cfg:
        state_dir = Path(str(cfg["state-dir"]))
    else:  # simulation: <results-dir>/clients/client-<pid>, or fedtune-sim --state-dir
        state_dir = SimulationNodes.read(Path(settings.results_dir)).client_state_dir(Path(settings.results_dir), pid)
    # The key seeds local training: from the data, not the node id, so a resumed run trains identically.
    return data, state_dir, pid if pid is not None else int(data.fingerprint[:7], 16)


def _policy(context: Context, settings: RunSettings) -> NodePolicy:
    """The node's own policy file (node config ``policy``); in simulation, fedtune-sim --policy-dir."""
    cfg = context.node_config
    if "policy" in cfg:
        return load_policy(Path(str(cfg["policy"])))
    if "partition-id" not in cfg:
        raise ConfigError("this node has no privacy policy: start it with --node-config \"policy=/path/policy.toml "
                          "...\" (see docs/privacy.md); the server's requested epsilon is never the budget")
    path = SimulationNodes.read(Path(settings.results_dir)).policy_file(int(cfg["partition-id"]))
    if path is not None:
        return load_policy(path)
    p = settings.privacy
    return simulation_default(p.epsilon, p.delta, p.accountant, p.dp)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = _settings(msg, context)
    data, state_dir, key = _node(context, settings)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1))
    run = RunRef(str(context.run_id), str(config.get("run-key", "")),  # run-key survives a server resume
                 resumed=int(config.get("resumed-after-round", 0)) > 0)
    outcome = train_round(
        settings, data, record_to_arrays(msg.content["arrays"]), server_round=server_round, run=run,
        node=NodePrivacy.open(_policy(context, settings), state_dir),
        seed=seed_for(settings.plan.seed, server_round, key),
    )
    metrics = MetricRecord({"partition-id": key, **outcome.metrics})
    if outcome.arrays is None:
        log.warning("node %s refused round %s: %s", key, server_round, outcome.reason)
        status = ConfigRecord({"reason": outcome.reason})  # no weights; the server logs why
        return Message(RecordDict({"metrics": metrics, "status": status}), reply_to=msg)
    return Message(RecordDict({"arrays": arrays_to_record(outcome.arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    settings = _settings(msg, context)
    data, _, key = _node(context, settings)
    device = pick_device()
    model = build_model(load_base(settings.model.model_path), len(data.label_names), settings.lora, device,
                        seed=settings.plan.seed)
    load_arrays(model, record_to_arrays(msg.content["arrays"]))
    result = evaluate(model, *data.test, device=device)
    metrics = MetricRecord({
        "partition-id": key, "num-examples": result.num_examples,
        "eval-loss": result.loss, "eval-accuracy": result.accuracy,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
