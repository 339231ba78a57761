"""The wire contract: the request a server sends for a round and every reply a node may return.

This file is the allow-list of what leaves a node. A node builds its reply only through
:class:`TrainReply`, :class:`EvalReply` or :class:`ErrorReply`; docs/privacy.md lists every field
and whether it is DP-protected, public by design, or a disclosed leak. The server's request is
treated as chosen by an adversary: :meth:`RoundRequest.from_record` accepts exactly the known keys,
checks every type and range, and rejects anything else with a code (never with the offending data).

Layout on Flower's records (kebab-case keys, as in the settings):

- request: one ``ConfigRecord`` ``"request"`` (+ the adapter as ``ArrayRecord`` ``"arrays"``);
- reply: ``ConfigRecord`` ``"status"`` (strings), ``MetricRecord`` ``"metrics"`` (numbers) and, for a
  trained round only, ``ArrayRecord`` ``"arrays"`` (the DP-noised adapter update).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_type_hints

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.schema import HEX64, KEY_ID, MAX_SEQ, NODE_ID, signature_problem
from fedtune.common.settings import (
    AggregationSettings,
    LoraSettings,
    ModelSettings,
    PrivacySettings,
    TrainPlan,
    key_of,
)

WIRE_VERSION = 3  # 2: the request carries the aggregation section (secure aggregation, client-level DP); 3: head-rounds
REQUEST, STATUS, METRICS, ARRAYS = "request", "status", "metrics", "arrays"

MAX_TEXT = 1024  # longest string the server may send in one field
MAX_LABELS = 512
# Upper bounds a node accepts from a server (a request beyond them is refused, not clipped).
LIMITS: dict[str, float] = {
    "max-seq-len": 8192, "lora-rank": 1024, "lora-alpha": 1e6, "num-rounds": 100_000, "local-epochs": 1000,
    "batch-size": 1_000_000, "learning-rate": 1e3, "lora-lr-scale": 1e3, "epsilon": 1e4, "clip-norm": 1e6,
    "nonprivate-learning-rate": 1e3, "nonprivate-lora-lr-scale": 1e3, "secagg-range": 1e6, "secagg-timeout": 1e7,
    "client-clip-norm": 1e6, "client-noise-multiplier": 1e6,
}

# Codes a node may send instead of a result; the text is fixed here, the detail stays in the node's log.
ERROR_CODES: dict[str, str] = {
    "BAD_REQUEST": "the server's request failed the node's checks",
    "DATA_MISSING": "the node's data file is missing or unreadable",
    "DATA_SCHEMA": "data check failed (columns, format or text)",
    "DATA_LABELS": "data check failed (labels do not match the run's labels)",
    "DATA_EMPTY": "too few training examples",
    "POLICY": "the node's privacy policy is missing or invalid",
    "LEDGER": "the node's privacy ledger is damaged or behind its witness",
    "MODEL": "the base model is not available on this node or does not fit the adapter",
    "TRAIN": "local training failed after the round was charged",
    "INTERNAL": "unexpected failure on the node",
}
# Why a node refused a round (its policy or its budget said no); detail in its ledger.
REFUSAL_CODES: dict[str, str] = {
    "POLICY_DP_REQUIRED": "the policy requires DP-SGD",
    "POLICY_SECURE_AGGREGATION": "the policy requires secure aggregation",
    "POLICY_DELTA": "the requested delta is above the policy's",
    "POLICY_STEPS": "more local steps per round than the policy allows",
    "POLICY_MODEL": "the base model is not in the policy's allowed models",
    "POLICY_TASK": "the node does not train this task",
    "POLICY_LABELS": "the labels differ from the ones the node declared",
    "POLICY_SEQ_LEN": "max-seq-len is above the policy's maximum",
    "POLICY_MIN_NOISE": "the plan needs less noise than the policy's minimum",
    "POLICY_MAX_NOISE": "the remaining budget only allows more noise than the policy's maximum",
    "PLAN_INFEASIBLE": "no noise level meets the requested epsilon",
    "BUDGET_EXHAUSTED": "the privacy budget is spent",
    "BUDGET_UNBOUNDED": "the dataset was trained without DP before",
}


class WireError(FedtuneError):
    """A record that does not follow the contract. ``code`` is what may be sent back; ``str()`` is local detail."""

    default_code = "BAD_REQUEST"


def error_message(code: str) -> str:
    """The only text a node sends with an error: fixed per code, no data."""
    return f"{ERROR_CODES.get(code, ERROR_CODES['INTERNAL'])}: see node log, code {code}"


def _check_type(key: str, kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (strict: no string-to-number parsing, no bools for numbers)."""
    literal = get_args(kind)
    if literal and all(isinstance(a, str) for a in literal):
        if value not in literal:
            raise ValueError(f"{key} must be one of {', '.join(literal)}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a bool")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number")
        return float(value)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{key} must be a string of at most {MAX_TEXT} characters")
    return value


def _section_from(section: type, record: ConfigRecord, problems: list[str]) -> Any:
    hints = get_type_hints(section)
    kwargs = {}
    for f in dataclasses.fields(section):
        key = key_of(f.name)
        if key not in record:
            problems.append(f"missing {key}")
            continue
        try:
            kwargs[f.name] = _check_type(key, hints[f.name], record[key])
        except ValueError as err:
            problems.append(str(err))
        if key in LIMITS and isinstance(kwargs.get(f.name), int | float) and kwargs[f.name] > LIMITS[key]:
            problems.append(f"{key} is above the node's limit {LIMITS[key]:g}")
    if len(kwargs) < len(dataclasses.fields(section)):
        return None
    value = section(**kwargs)
    problems += value.problems()
    return value


_SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelSettings), ("lora", LoraSettings), ("plan", TrainPlan), ("privacy", PrivacySettings),
    ("aggregation", AggregationSettings))
_ROUND_KEYS = ("wire-version", "server-round", "run-key", "resumed-after-round", "labels")


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of a node for one round (training or local evaluation).

    Carries no seed, no data columns, no paths of the node and nothing that keys its budget: the node's
    randomness, data and budget are its own.
    """

    server_round: int
    run_key: str  # the server's settings hash; a resumed run keeps it (the node reuses its noise plan)
    resumed_after_round: int  # > 0 when the server resumed this run from a checkpoint
    labels: tuple[str, ...]  # class or tag names in the order of the adapter's head (empty for sft)
    model: ModelSettings
    lora: LoraSettings
    plan: TrainPlan
    privacy: PrivacySettings  # the server's *request*; the node's policy decides
    aggregation: AggregationSettings = dataclasses.field(default_factory=AggregationSettings)

    def to_record(self) -> ConfigRecord:
        out: dict[str, Any] = {"wire-version": WIRE_VERSION, "server-round": self.server_round,
                               "run-key": self.run_key, "resumed-after-round": self.resumed_after_round,
                               "labels": list(self.labels)}
        for name, _ in _SECTIONS:
            section = getattr(self, name)
            out |= {key_of(f.name): getattr(section, f.name) for f in dataclasses.fields(section)}
        return ConfigRecord(out)

    def for_round(self, server_round: int) -> RoundRequest:
        return dataclasses.replace(self, server_round=server_round)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundRequest:
        """Parse and check a request; raise WireError (code BAD_REQUEST) listing every problem."""
        known = set(_ROUND_KEYS) | {key_of(f.name) for _, s in _SECTIONS for f in dataclasses.fields(s)}
        problems = [f"unknown key {k[:64]!r}" for k in record if k not in known]
        if record.get("wire-version") != WIRE_VERSION:
            problems.append(f"wire-version must be {WIRE_VERSION}")
        fields: dict[str, Any] = {}
        for key, kind in (("server-round", int), ("run-key", str), ("resumed-after-round", int)):
            try:
                fields[key] = _check_type(key, kind, record.get(key))
            except ValueError as err:
                problems.append(str(err))
        if fields.get("server-round", 1) < 1 or fields.get("resumed-after-round", 0) < 0:
            problems.append("server-round must be >= 1 and resumed-after-round >= 0")
        labels = record.get("labels")
        # No labels: a task without classes (sft); the node's task code checks the labels it needs.
        if not (isinstance(labels, list) and (len(labels) == 0 or 2 <= len(labels) <= MAX_LABELS)
                and all(isinstance(x, str) and 0 < len(x) <= 128 for x in labels) and len(set(labels)) == len(labels)):
            problems.append(f"labels must be empty or 2 to {MAX_LABELS} distinct non-empty strings")
        sections = {name: _section_from(section, record, problems) for name, section in _SECTIONS}
        if problems or not isinstance(labels, list):
            raise WireError(problems)
        return cls(fields["server-round"], fields["run-key"], fields["resumed-after-round"],
                   tuple(str(x) for x in labels), **sections)


def _finite_or_inf(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{key} must be a number")
    return float(value)


@dataclass(frozen=True)
class TrainReply:
    """A node's answer to a training request (with the adapter update when ``status`` is trained)."""

    status: Literal["trained", "refused"]
    code: str  # "" when trained; a REFUSAL_CODES key when refused
    num_examples: int  # training examples (disclosed: FedAvg weights by it)
    epsilon: float  # the dataset's cumulative epsilon after this round (inf: trained without DP)
    epsilon_round: float  # what this round cost (0 when refused)
    epsilon_budget: float  # the node's budget (public by design)
    noise_multiplier: float  # sigma of this round (0 without DP or when refused before planning)
    exhausted: bool  # the node expects to refuse the next round
    ledger_key: str  # "ed25519:<hex>": the key that signs the node's ledger
    ledger_seq: int  # sequence number of the ledger entry recording this round (the receipt)
    ledger_head: str  # hash of that entry
    node_sig: str  # the node's Ed25519 signature (ledger key) over run, round, seq, head, status: receipts.sign_receipt
    node: str = ""  # the node's identity (sha256 of its authentication key, or simulation:client-<id>)
    train_loss: float | None = None  # only when the node's policy releases it (a disclosed leak)

    STATUS_KEYS: ClassVar[tuple[str, ...]] = (
        "wire-version", "status", "code", "ledger-key", "ledger-head", "node-sig", "node")
    METRIC_KEYS: ClassVar[tuple[str, ...]] = (
        "num-examples", "epsilon", "epsilon-round", "epsilon-budget", "noise-multiplier", "exhausted", "ledger-seq")
    OPTIONAL_METRICS: ClassVar[tuple[str, ...]] = ("train-loss",)

    def __post_init__(self) -> None:
        if self.status == "refused" and self.code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {self.code[:64]!r}")

    def to_content(self, arrays: ArrayRecord | None) -> RecordDict:
        if (arrays is not None) != (self.status == "trained"):
            raise WireError("a trained reply carries the adapter and a refusal does not", code="INTERNAL")
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": self.num_examples, "epsilon": self.epsilon, "epsilon-round": self.epsilon_round,
            "epsilon-budget": self.epsilon_budget, "noise-multiplier": self.noise_multiplier,
            "exhausted": int(self.exhausted), "ledger-seq": self.ledger_seq}
        if self.train_loss is not None:
            metrics["train-loss"] = self.train_loss
        content = RecordDict({
            STATUS: ConfigRecord({"wire-version": WIRE_VERSION, "status": self.status, "code": self.code,
                                  "ledger-key": self.ledger_key, "ledger-head": self.ledger_head,
                                  "node-sig": self.node_sig, "node": self.node}),
            METRICS: MetricRecord(metrics)})
        if arrays is not None:
            content[ARRAYS] = arrays
        return content

    @classmethod
    def from_status_metrics(cls, status: ConfigRecord, metrics: MetricRecord) -> TrainReply:
        problems = _exact_keys(status, cls.STATUS_KEYS, (), "status") + _exact_keys(
            metrics, cls.METRIC_KEYS, cls.OPTIONAL_METRICS, "metrics")
        if problems:
            raise WireError(problems, code="MALFORMED")
        try:
            kind = _check_type("status", Literal["trained", "refused"], status["status"])
            reply = cls(
                status=kind, code=_check_type("code", str, status["code"]),
                num_examples=_check_type("num-examples", int, metrics["num-examples"]),
                epsilon=_finite_or_inf("epsilon", metrics["epsilon"]),
                epsilon_round=_finite_or_inf("epsilon-round", metrics["epsilon-round"]),
                epsilon_budget=_check_type("epsilon-budget", float, metrics["epsilon-budget"]),
                noise_multiplier=_check_type("noise-multiplier", float, metrics["noise-multiplier"]),
                exhausted=_check_type("exhausted", int, metrics["exhausted"]) == 1,
                ledger_key=_check_type("ledger-key", str, status["ledger-key"]),
                ledger_seq=_check_type("ledger-seq", int, metrics["ledger-seq"]),
                ledger_head=_check_type("ledger-head", str, status["ledger-head"]),
                node_sig=_check_type("node-sig", str, status["node-sig"]),
                node=_check_type("node", str, status["node"]),
                train_loss=_check_type("train-loss", float, metrics["train-loss"]) if "train-loss" in metrics else None,
            )
        except ValueError as err:
            raise WireError(str(err), code="MALFORMED") from err
        bad = []
        # The same validators as the ledger and the receipts: an accepted reply always makes a valid receipt.
        if not KEY_ID.fullmatch(reply.ledger_key) or not HEX64.fullmatch(reply.ledger_head) \
                or not 1 <= reply.ledger_seq <= MAX_SEQ:
            bad.append("ledger receipt (key, seq, head) is malformed")
        if (sig := signature_problem(reply.node_sig)) is not None:
            bad.append(f"node-sig {sig}")
        if reply.node and not NODE_ID.fullmatch(reply.node):
            bad.append("node identity is malformed")
        if reply.status == "trained" and (reply.code or reply.num_examples < 1):
            bad.append("a trained reply needs num-examples >= 1 and no code")
        if reply.epsilon < 0 or reply.epsilon_round < 0 or reply.noise_multiplier < 0:
            bad.append("epsilon and noise must be >= 0")
        if bad:
            raise WireError(bad, code="MALFORMED")
        return reply


@dataclass(frozen=True)
class EvalReply:
    """A node's answer to a local-evaluation request; ``declined`` unless its policy releases local evaluation."""

    status: Literal["evaluated", "declined"]
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None

    def to_content(self) -> RecordDict:
        content = RecordDict({STATUS: ConfigRecord({"wire-version": WIRE_VERSION, "status": self.status})})
        if self.status == "evaluated":
            content[METRICS] = MetricRecord({"num-examples": self.num_examples, "eval-loss": float(self.loss or 0.0),
                                             "eval-accuracy": float(self.accuracy or 0.0)})
        return content

    @classmethod
    def from_status_metrics(cls, status: ConfigRecord, metrics: MetricRecord | None) -> EvalReply:
        if status.get("status") == "declined" and metrics is None:
            return cls("declined")
        keys = ("num-examples", "eval-loss", "eval-accuracy")
        if status.get("status") != "evaluated" or metrics is None or (problems := _exact_keys(metrics, keys, (), "m")):
            raise WireError("malformed evaluation reply", code="MALFORMED")
        try:
            n = _check_type("num-examples", int, metrics["num-examples"])
            loss = _check_type("eval-loss", float, metrics["eval-loss"])
            acc = _check_type("eval-accuracy", float, metrics["eval-accuracy"])
        except ValueError as err:
            raise WireError(str(err), code="MALFORMED") from err
        if n < 1 or not 0.0 <= acc <= 1.0 or loss < 0 or problems:
            raise WireError("evaluation values out of range", code="MALFORMED")
        return cls("evaluated", n, loss, acc)


@dataclass(frozen=True)
class ErrorReply:
    """A node could not act on the request: a code from ERROR_CODES and its fixed message, nothing else."""

    code: str

    def to_content(self) -> RecordDict:
        code = self.code if self.code in ERROR_CODES else "INTERNAL"
        return RecordDict({STATUS: ConfigRecord({"wire-version": WIRE_VERSION, "status": "error", "code": code,
                                                 "message": error_message(code)})})


def _exact_keys(record: Any, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> list[str]:
    keys = set(record)
    out = [f"{where}: missing {k}" for k in required if k not in keys]
    out += [f"{where}: unexpected key {k[:64]!r}" for k in sorted(keys - set(required) - set(optional))]
    return out


def parse_reply(content: RecordDict, evaluation: bool = False, summed: bool = False,
                ) -> TrainReply | EvalReply | ErrorReply:
    """Server side: a node's reply as one of the contract's types; WireError (code MALFORMED) otherwise.

    ``summed``: the round ran under secure aggregation, where a trained update travels only inside the secure sum
    (the reply itself carries no adapter)."""
    status = content.config_records.get(STATUS)
    if status is None:
        raise WireError("reply has no status record", code="MALFORMED")
    if status.get("status") == "error":
        code = status.get("code")
        return ErrorReply(code if isinstance(code, str) and code in ERROR_CODES else "INTERNAL")
    if status.get("wire-version") != WIRE_VERSION:
        raise WireError("reply has another wire-version", code="MALFORMED")
    metrics = content.metric_records.get(METRICS)
    if evaluation:
        return EvalReply.from_status_metrics(status, metrics)
    if metrics is None:
        raise WireError("reply has no metrics record", code="MALFORMED")
    reply = TrainReply.from_status_metrics(status, metrics)
    has_arrays = ARRAYS in content.array_records
    if summed and has_arrays:
        raise WireError("under secure aggregation a reply must not carry the adapter", code="MALFORMED")
    if not summed and has_arrays != (reply.status == "trained"):
        raise WireError("a trained reply must carry the adapter and a refusal must not", code="MALFORMED")
    return reply
