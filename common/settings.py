"""Typed run settings, parsed once at the edge from Flower's run config or CLI flags.

Every setting has a kebab-case key (``lora-rank``) in ``[tool.flwr.app.config]`` and
on the CLI; inside the code only these frozen dataclasses are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedtune.common.errors import ConfigError
from fedtune.common.setting_values import build_section, key_of, legacy_dp

PartitionerName = Literal["iid", "dirichlet", "natural"]
LoraVariant = Literal["lora", "ffa"]
AccountantName = Literal["prv", "rdp"]
OptimizerName = Literal["sgd", "adamw"]
TaskName = Literal["classify", "ner", "sft"]
# examples: FedAvg weighted by each node's reported num-examples, capped; equal: every trained node the same weight.
WeightingName = Literal["examples", "equal"]
ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam"]
# dp: DP-SGD (clipping + noise, accounted). clip-only: the same pipeline with noise multiplier 0 (no privacy; isolates
# the cost of the noise). off: plain non-private training with the non-private optimiser (no clipping, no noise).
DpMode = Literal["dp", "clip-only", "off"]


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ModelSettings:
    """Which base model to fine-tune and how its inputs are shaped."""

    task: TaskName = _help(
        "What is fine-tuned: classify (sentence classification), ner (token classification, BIO tags) or sft "
        "(instruction tuning of a causal LM, loss on response tokens only).", "classify")
    model_path: str = _help("Local Hugging Face model directory; empty = the task's embedded model "
                            "(all-MiniLM-L6-v2; SmolLM2-135M-Instruct for sft).", "")
    max_seq_len: int = _help("Tokens per example after truncation.", 48)
    base_model_id: str = _help(
        "Hub id[@revision] that model-path is a copy of, recorded in the adapter and model card; "
        "empty = the embedded model's id, or model-path's directory name.", "")

    def problems(self) -> list[str]:
        return [] if self.max_seq_len >= 4 else [f"max-seq-len must be >= 4, got {self.max_seq_len}"]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (PEFT ``LoraConfig``)."""

    lora_rank: int = _help("LoRA rank r (> 0).", 8)
    lora_alpha: float = _help("LoRA scaling alpha (> 0); the update is scaled by alpha / r.", 16.0)
    lora_dropout: float = _help("Dropout on the LoRA input, in [0, 1).", 0.0)
    lora_targets: str = _help("Comma-separated module names that get LoRA factors.", "query,value")
    lora_layers: str = _help("Comma-separated layer indices that get LoRA, counted from 0 at the bottom or from -1 "
                             "at the top; empty = every layer. Layers below the lowest one are frozen: a node computes "
                             "their output once per job (see docs/results.md, accuracy study).", "-2,-1")
    lora_variant: LoraVariant = _help(
        "lora: train A and B; ffa: FFA-LoRA, A stays at its shared seeded init and only B trains "
        "(FedAvg of B is then exact, and DP noise covers half the dimensions).", "lora")

    @property
    def target_modules(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def layers(self) -> list[int]:
        """The indices as given (negative ones count from the top: see :meth:`layers_of`)."""
        return [int(t) for t in self.lora_layers.split(",") if t.strip()]

    def layers_of(self, depth: int) -> list[int] | None:
        """The layers of a ``depth``-layer model that get LoRA, ascending (None: every layer); ValueError names an
        index the model does not have."""
        if not self.layers:
            return None
        wrong = [i for i in self.layers if not -depth <= i < depth]
        if wrong:
            raise ValueError(f"lora-layers {self.lora_layers!r} names layer(s) {wrong} of a model with {depth} layers "
                             f"(0..{depth - 1}, or -{depth}..-1 from the top)")
        return sorted({i % depth for i in self.layers})

    def problems(self) -> list[str]:
        out = []
        if self.lora_rank <= 0:
            out.append(f"lora-rank must be > 0, got {self.lora_rank}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            out.append(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            out.append("lora-targets must name at least one module, got an empty list")
        try:
            if len(set(self.layers)) != len(self.layers):
                out.append(f"lora-layers names a layer twice: {self.lora_layers!r}")
        except ValueError:
            out.append(f"lora-layers must be comma-separated integers, got {self.lora_layers!r}")
        return out


@dataclass(frozen=True)
class PrivacySettings:
    """Sample-level DP-SGD for each client (Opacus)."""

    dp_mode: DpMode = _help(
        "dp: DP-SGD (clipping + noise). clip-only: the DP pipeline with noise multiplier 0, same optimiser (no "
        "privacy; isolates the cost of the noise). off: non-private training with the nonprivate-* optimiser (the "
        "baseline; fedtune-sim --no-dp). Both non-private modes report epsilon inf and need require-dp = false.", "dp")
    epsilon: float = _help("Each client's total epsilon budget for this run (> 0).", 8.0)
    delta: float = _help("Each client's delta, in (0, 1); well below 1 / examples.", 1e-5)
    clip_norm: float = _help("Per-sample gradient clipping norm C (> 0).", 1.0)
    accountant: AccountantName = _help("Opacus accountant: prv (tight) or rdp.", "prv")

    @property
    def dp(self) -> bool:
        """Whether the run asks for a privacy guarantee (clip-only and off have none)."""
        return self.dp_mode == "dp"

    def problems(self) -> list[str]:
        out = []
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            out.append(f"epsilon must be > 0 and finite, got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            out.append(f"delta must be in (0, 1), got {self.delta}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            out.append(f"clip-norm must be > 0, got {self.clip_norm}")
        return out


@dataclass(frozen=True)
class TrainPlan:
    """Each round's local work and optimiser: sent to the nodes as part of the round's request."""

    num_rounds: int = _help("Federated rounds.", 3)
    local_epochs: float = _help("Local passes over the client's data per round (expected).", 1.0)
    batch_size: int = _help("Expected batch size (Poisson sampling under DP).", 128)
    optimizer: OptimizerName = _help("Local optimiser: sgd (momentum 0.9; best under DP) or adamw.", "sgd")
    learning_rate: float = _help("Learning rate of the classifier head.", 2.0)
    lora_lr_scale: float = _help("LoRA factors' learning rate = learning-rate x this (> 0).", 0.1)
    nonprivate_optimizer: OptimizerName = _help(
        "Local optimiser of non-private training (dp-mode off): adamw (tuned baseline) or sgd (momentum 0.9).", "adamw")
    nonprivate_learning_rate: float = _help("Head learning rate of non-private training (dp-mode off).", 5e-3)
    nonprivate_lora_lr_scale: float = _help(
        "LoRA factors' learning rate under dp-mode off = nonprivate-learning-rate x this (> 0).", 0.2)
    head_rounds: int = _help(
        "Rounds 1..k train the classifier head only (LP-FT: a linear probe first); the LoRA factors keep the "
        "global adapter's values until round k + 1. 0 = both train from round 1.", 0)

    def problems(self) -> list[str]:
        out = []
        if self.num_rounds <= 0:
            out.append(f"num-rounds must be > 0, got {self.num_rounds}")
        if not (self.local_epochs > 0 and math.isfinite(self.local_epochs)):
            out.append(f"local-epochs must be > 0, got {self.local_epochs}")
        if self.batch_size <= 0:
            out.append(f"batch-size must be > 0, got {self.batch_size}")
        if self.head_rounds < 0:
            out.append(f"head-rounds must be >= 0, got {self.head_rounds}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            out.append(f"learning-rate must be > 0, got {self.learning_rate}")
        for key, value in (("lora-lr-scale", self.lora_lr_scale),
                           ("nonprivate-learning-rate", self.nonprivate_learning_rate),
                           ("nonprivate-lora-lr-scale", self.nonprivate_lora_lr_scale)):
            if not (value > 0 and math.isfinite(value)):
                out.append(f"{key} must be > 0, got {value}")
        return out


@dataclass(frozen=True)
class FederationSettings:
    """How the server runs the federation: sampling, deadlines, its own seed. Never sent to nodes."""

    fraction_train: float = _help("Fraction of clients sampled per round, in (0, 1].", 1.0)
    fraction_evaluate: float = _help(
        "Fraction of clients asked to evaluate the global adapter on their local test split, in [0, 1] "
        "(a node answers only if its policy releases local evaluation).", 1.0)
    min_clients: int = _help("Fewest clients a round needs.", 2)
    seed: int = _help("Server-side seed: initial adapter, held-out split, client sampling, simulation split. "
                      "Nodes never use it.", 42)
    node_wait_timeout: float = _help("Seconds to wait for min-clients nodes to connect before a round; "
                                     "then the run stops early (resumable).", 600.0)
    round_timeout: float = _help("Seconds a round waits for replies; nodes that have not answered by then "
                                 "are left out of that round.", 600.0)
    divergence_factor: float = _help(
        "Stop the run as diverged (exit 5) when the held-out loss rises above this many times its round-0 value; "
        "a non-finite loss always stops it. 0 = check non-finite losses only.", 3.0)
    weighting: WeightingName = _help(
        "How FedAvg weights the trained nodes' updates: examples (by the num-examples each node reports, which "
        "the server cannot check, capped at max-node-examples) or equal (every trained node the same weight: "
        "a node's claim changes nothing).", "examples")
    max_node_examples: int = _help(
        "Under weighting = examples, the most examples one node's weight counts: a node reporting more weighs "
        "this much. 0 = 4 x the median num-examples of the round's trained nodes; with fewer than 3 trained "
        "nodes that median is no robust bound (one node can set it), so set this or use weighting = equal.", 0)
    server_optimizer: ServerOptimizerName = _help(
        "The server's step on the round's mean (FedOpt): fedavg (the mean, scaled by server-learning-rate), "
        "fedavgm (momentum server-momentum) or fedadam; post-processing, no node's epsilon changes.", "fedavg")
    server_learning_rate: float = _help("Server learning rate of server-optimizer (> 0); fedavg at 1 = the mean.", 1.0)
    server_momentum: float = _help("Momentum of server-optimizer fedavgm, in [0, 1).", 0.9)

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.fraction_train <= 1.0:
            out.append(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            out.append(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.min_clients <= 0:
            out.append(f"min-clients must be > 0, got {self.min_clients}")
        for name, value in (("node-wait-timeout", self.node_wait_timeout), ("round-timeout", self.round_timeout)):
            if not (value > 0 and math.isfinite(value)):
                out.append(f"{name} must be > 0 seconds, got {value}")
        if not (self.divergence_factor == 0 or (self.divergence_factor > 1 and math.isfinite(self.divergence_factor))):
            out.append(f"divergence-factor must be 0 (off) or > 1, got {self.divergence_factor}")
        if self.max_node_examples < 0:
            out.append(f"max-node-examples must be >= 0 (0 = 4 x the round's median), got {self.max_node_examples}")
        if not (self.server_learning_rate > 0 and math.isfinite(self.server_learning_rate)):
            out.append(f"server-learning-rate must be > 0, got {self.server_learning_rate}")
        if not 0.0 <= self.server_momentum < 1.0:
            out.append(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        return out


@dataclass(frozen=True)
class DataSettings:
    """Where examples come from and how they are split between clients."""

    dataset: str = _help("Built-in corpus name (rotten-tomatoes) or a CSV/JSONL/Parquet path.", "rotten-tomatoes")
    text_column: str = _help("Column holding the input text.", "text")
    label_column: str = _help("Column holding the class label.", "label")
    labels: str = _help("Comma-separated label values in class order; empty = sorted values seen.", "")
    partitioner: PartitionerName = _help("How examples are split: iid, dirichlet (on labels), natural.", "natural")
    partition_by: str = _help("Column whose values group examples for the natural split.", "movie_name")
    dirichlet_alpha: float = _help("Dirichlet concentration (> 0); small = very non-IID.", 0.5)
    test_fraction: float = _help("Fraction held out for server-side evaluation, in (0, 1).", 0.15)
    max_train_examples: int = _help("Cap on training examples across all clients (0 = no cap).", 0)
    report_group_column: str = _help(
        "Column of the data whose values the run report breaks held-out results down by (fairness view); "
        "empty = none.", "")
    data_description: str = _help(
        "What the training data is (source, period, population, consent), for the model card; never rows.", "")

    @property
    def label_list(self) -> list[str]:
        return [t.strip() for t in self.labels.split(",") if t.strip()]

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("dataset must name a built-in corpus or a file, got an empty value")
        if not self.dirichlet_alpha > 0:
            out.append(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        if not 0.0 < self.test_fraction < 1.0:
            out.append(f"test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_train_examples < 0:
            out.append(f"max-train-examples must be >= 0, got {self.max_train_examples}")
        return out


@dataclass(frozen=True)
class AggregationSettings:
    """Secure aggregation (Flower's SecAgg+) and client-level DP on the sum: sent to the nodes with the request."""

    secure_aggregation: bool = _help(
        "Sum the nodes' adapter updates with Flower's SecAgg+ protocol: the server sees only the sum (every node "
        "weighs the same). A node's policy can require it (require-secure-aggregation).", False)
    secagg_shares: float = _help("Fraction of the round's nodes each node shares mask keys with, in (0, 1].", 1.0)
    secagg_threshold: float = _help(
        "Fraction of a node's share group that must answer for its masks to be removed, in (0.5, 1]: the round "
        "completes with the nodes that remain while this holds, and fails cleanly (no aggregate) below it.", 0.6)
    secagg_timeout: float = _help("Seconds each SecAgg+ key stage (setup, share keys, unmask) waits; a node that "
                                  "has not answered is dropped. The training stage waits round-timeout.", 120.0)
    secagg_range: float = _help(
        "Largest |value| of one node's update coordinate the secure sum carries; beyond it a value is clamped and "
        "counted in the round's secagg-clamped. 0 = from the learning rate and clip norm (see docs/secure-"
        "aggregation.md); with client-dp it follows client-clip-norm.", 0.0)
    client_dp: bool = _help(
        "Client-level DP on the secure sum (distributed DP): each trained node clips its round update to "
        "client-clip-norm and adds its share of Skellam noise, so that the sum carries noise "
        "client-noise-multiplier x client-clip-norm once the protocol's threshold of nodes is in it.", False)
    client_clip_norm: float = _help("L2 bound of one node's round update under client-dp (> 0).", 1.0)
    client_noise_multiplier: float = _help("Noise of the secure sum under client-dp, in client-clip-norms.", 1.0)

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.secagg_shares <= 1.0:
            out.append(f"secagg-shares must be in (0, 1], got {self.secagg_shares}")
        if not 0.5 < self.secagg_threshold <= 1.0:
            out.append(f"secagg-threshold must be in (0.5, 1], got {self.secagg_threshold}")
        if not (self.secagg_timeout > 0 and math.isfinite(self.secagg_timeout)):
            out.append(f"secagg-timeout must be > 0 seconds, got {self.secagg_timeout}")
        if not (self.secagg_range >= 0 and math.isfinite(self.secagg_range)):
            out.append(f"secagg-range must be >= 0 (0 = automatic), got {self.secagg_range}")
        for key, value in (("client-clip-norm", self.client_clip_norm),
                           ("client-noise-multiplier", self.client_noise_multiplier)):
            if not (value > 0 and math.isfinite(value)):
                out.append(f"{key} must be > 0, got {value}")
        if self.client_dp and not self.secure_aggregation:
            out.append("client-dp needs secure-aggregation = true (its noise is split between the nodes of the "
                       "secure sum); set both")
        return out


SECTIONS = (ModelSettings, LoraSettings, PrivacySettings, TrainPlan, FederationSettings, DataSettings,
            AggregationSettings)
SECTION_NAMES = ("model", "lora", "privacy", "plan", "federation", "data", "aggregation")


@dataclass(frozen=True)
class RunSettings:
    """Everything one federated run needs, grouped by concern."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    plan: TrainPlan = field(default_factory=TrainPlan)
    federation: FederationSettings = field(default_factory=FederationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    results_dir: str = "results/latest"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Parse a flat kebab-case mapping; report every bad or unknown key at once."""
        problems: list[str] = []
        config = legacy_dp(config, problems)
        known = {key_of(f.name) for s in SECTIONS for f in dataclasses.fields(s)} | {"results-dir"}
        problems += [f"unknown setting '{k}' (known: {', '.join(sorted(known))})" for k in config if k not in known]
        parts = {}
        for name, section in zip(SECTION_NAMES, SECTIONS, strict=True):
            parts[name] = build_section(section, config, problems)
        results_dir = str(config.get("results-dir", cls.results_dir))
        if problems:
            raise ConfigError(problems)
        out = cls(results_dir=results_dir, **parts)
        if problems := out.problems():
            raise ConfigError(problems)
        return out

    def problems(self) -> list[str]:
        return [p for s in self.sections() for p in s.problems()]

    def sections(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in SECTION_NAMES)

    def to_config(self) -> dict[str, bool | int | float | str]:
        """Flatten back to kebab-case keys (for Flower run config and ConfigRecords)."""
        out: dict[str, bool | int | float | str] = {}
        for section in self.sections():
            for f in dataclasses.fields(section):
                out[key_of(f.name)] = getattr(section, f.name)
        out["results-dir"] = self.results_dir
        return out


def help_table() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting, for CLI help and docs."""
    return [
        (key_of(f.name), f.default, f.metadata.get("help", ""))
        for s in SECTIONS
        for f in dataclasses.fields(s)
    ]
