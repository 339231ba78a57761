"""Which of the settings a researcher gave have no effect in the run's mode, and what applies instead.

A setting that only matters to another mode (the DP optimiser under ``--no-dp``, a partitioner for the central
baseline, which has nothing to split) is never an error: the run goes on, and says once, per setting, that the
value is not used and which setting or mode is. Only settings given explicitly (a flag or ``--set``) are named;
defaults and a task's preset job are not the researcher's choice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from fedtune.common.settings import RunSettings
from fedtune.common.tasks import get_task


@dataclass(frozen=True)
class Mode:
    """What decides which settings apply: the run's settings and how fedtune-sim runs it."""

    settings: RunSettings
    central: bool = False  # the central baseline: one node, in this process, no Flower
    clients: int = 2  # simulated nodes of a federated run

    @property
    def dp_mode(self) -> str:
        return self.settings.privacy.dp_mode

    @property
    def splits(self) -> bool:
        """Whether the training pool is split between nodes (the partitioner's settings apply)."""
        return not self.central and self.clients > 1


@dataclass(frozen=True)
class Rule:
    """``keys`` have no effect in a mode for which ``when(mode)`` names the reason's context (``"with --central"``),
    and ``instead(mode, key)`` says what applies."""

    keys: tuple[str, ...]
    when: Callable[[Mode], str | None]
    instead: Callable[[Mode, str], str]


_NONPRIVATE = {"optimizer": "nonprivate-optimizer", "learning-rate": "nonprivate-learning-rate",
               "lora-lr-scale": "nonprivate-lora-lr-scale"}
_PRIVATE = {v: k for k, v in _NONPRIVATE.items()}


def _value(mode: Mode, key: str) -> object:
    return mode.settings.to_config()[key]


def _dp_mode(*modes: str) -> Callable[[Mode], str | None]:
    def when(mode: Mode) -> str | None:
        if mode.dp_mode not in modes:
            return None
        return "with --no-dp (dp-mode off)" if mode.dp_mode == "off" else f"with dp-mode {mode.dp_mode}"
    return when


def _central(mode: Mode) -> str | None:
    return "with --central" if mode.central else None


def _one_node(mode: Mode) -> str | None:
    return "with --central" if mode.central else "with one client" if not mode.splits else None


def _partitioner(*names: str) -> Callable[[Mode], str | None]:
    def when(mode: Mode) -> str | None:
        name = mode.settings.data.partitioner
        return f"with partitioner {name}" if mode.splits and name in names else None
    return when


def _equal_weighting(mode: Mode) -> str | None:
    return "with weighting equal" if not mode.central and mode.settings.federation.weighting == "equal" else None


def _plain(mode: Mode) -> str | None:
    return "without --secure-aggregation" if not mode.central and not mode.settings.aggregation.secure_aggregation \
        else None


def _secure(mode: Mode) -> str | None:
    return "with --secure-aggregation" if not mode.central and mode.settings.aggregation.secure_aggregation else None


def _no_client_dp(mode: Mode) -> str | None:
    return "without --client-dp" if not mode.central and mode.settings.aggregation.secure_aggregation \
        and not mode.settings.aggregation.client_dp else None


def _headless(mode: Mode) -> str | None:
    task = get_task(mode.settings.model.task)
    return None if task.labelled else f"with --task {task.name}"


def _not_fedavgm(mode: Mode) -> str | None:
    name = mode.settings.federation.server_optimizer
    return None if mode.central or name == "fedavgm" else f"with server-optimizer {name}"


RULES = (
    Rule(tuple(_NONPRIVATE), _dp_mode("off"),
         lambda m, k: f"non-private training uses {_NONPRIVATE[k]} (now {_value(m, _NONPRIVATE[k])!r})"),
    Rule(tuple(_PRIVATE), _dp_mode("dp", "clip-only"),
         lambda m, k: f"this run trains with {_PRIVATE[k]} (now {_value(m, _PRIVATE[k])!r}); {k} applies with --no-dp"),
    Rule(("epsilon", "delta", "accountant"), _dp_mode("off", "clip-only"),
         lambda m, k: "no noise is added and no budget is spent; it applies with dp-mode dp (the default)"),
    Rule(("clip-norm",), _dp_mode("off"),
         lambda m, k: "gradients are not clipped; it applies with dp-mode dp or clip-only"),
    Rule(("partitioner", "partition-by", "dirichlet-alpha"), _one_node,
         lambda m, k: "one node trains on the whole training pool (set by test-fraction and max-train-examples); "
                      "the partitioner applies to federated runs of two or more clients"),
    Rule(("partition-by",), _partitioner("iid", "dirichlet"),
         lambda m, k: "this partitioner groups by no column; partition-by applies with --partitioner natural"),
    Rule(("dirichlet-alpha",), _partitioner("iid", "natural"),
         lambda m, k: "this partitioner draws no label proportions; dirichlet-alpha applies with --partitioner "
                      "dirichlet"),
    Rule(("fraction-train", "fraction-evaluate", "min-clients", "weighting", "max-node-examples", "node-wait-timeout",
          "round-timeout", "server-optimizer", "server-learning-rate", "server-momentum"), _central,
         lambda m, k: "the central baseline has one node and no aggregation; num-rounds and local-epochs set its "
                      "training"),
    Rule(("server-momentum",), _not_fedavgm,
         lambda m, k: "only fedavgm keeps a momentum; it applies with --set server-optimizer=fedavgm"),
    Rule(("head-rounds",), _headless,
         lambda m, k: "this task has no head to train alone: its LoRA factors train from round 1"),
    Rule(("max-node-examples",), _equal_weighting,
         lambda m, k: "every node gets the same weight; max-node-examples applies with weighting examples"),
    Rule(("secagg-shares", "secagg-threshold", "secagg-timeout", "secagg-range"), _plain,
         lambda m, k: "the server averages the nodes' updates itself; SecAgg+'s settings apply with "
                      "--secure-aggregation"),
    Rule(("weighting", "max-node-examples"), _secure,
         lambda m, k: "the secure sum weighs every node the same (docs/secure-aggregation.md)"),
    Rule(("client-clip-norm", "client-noise-multiplier"), _no_client_dp,
         lambda m, k: "the secure sum carries no client-level noise; it applies with --client-dp"),
    Rule(("secure-aggregation", "client-dp", "secagg-shares", "secagg-threshold", "secagg-timeout", "secagg-range",
          "client-clip-norm", "client-noise-multiplier"), _central,
         lambda m, k: "the central baseline has one node and no aggregation"),
    Rule(("--clients", "--cpus-per-client", "--ray-address"), _central,
         lambda m, k: "the central baseline is one node trained in this process, without Flower or Ray"),
)


def inert_settings(mode: Mode, given: Collection[str]) -> dict[str, str]:
    """One warning for each given setting (kebab key, or a flag such as ``--clients``) that has no effect in
    ``mode``, by setting, in the order of ``given``; each names what applies instead."""
    warnings: dict[str, str] = {}
    for key in dict.fromkeys(given):
        for rule in RULES:
            context = rule.when(mode) if key in rule.keys else None
            if context is not None:
                shown = key if key.startswith("--") else f"{key}={_value(mode, key)!r}"
                warnings[key] = f"{shown} has no effect {context}: {rule.instead(mode, key)}"
                break
    return warnings
