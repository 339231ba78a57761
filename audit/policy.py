"""The auditor's reading of a node's policy file: only the limits the audit applies.

The node's policy TOML (``client/policy.py``) has more keys; the auditor reads
``max-epsilon``, ``delta``, ``accountant`` and ``dataset-id`` and ignores the rest,
with the node's defaults for the optional ones (delta 1e-5, accountant prv, no
dataset-id). This is a reader of its own, so that the audit does not run the code
it audits.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError

DEFAULT_DELTA = 1e-5  # the node's default (client/policy.py)
DEFAULT_ACCOUNTANT = "prv"
MAX_POLICY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AuditPolicy:
    """The limits a node's ledger is held to."""

    max_epsilon: float  # the dataset's lifetime budget
    delta: float  # every epsilon is accounted at this delta
    accountant: str  # prv | rdp: the accountant the node must use
    dataset_id: str  # the budget key; "" = not fixed by the policy
    source: str  # where these limits came from (a file, or a ledger line)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_epsilon, bool) or not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            problems.append(f"max-epsilon must be > 0 and finite, got {self.max_epsilon!r}")
        if isinstance(self.delta, bool) or not 0.0 < self.delta < 1.0:
            problems.append(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ("prv", "rdp"):
            problems.append(f"accountant must be prv or rdp, got {self.accountant!r}")
        if problems:
            raise ConfigError([f"{self.source}: {p}" for p in problems])


def _number(raw: dict[str, Any], key: str, default: float | None, path: Path, problems: list[str]) -> float:
    value = raw.get(key, default)
    if value is None:
        problems.append(f"{path}: {key} is required")
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{path}: {key} must be a number, got {value!r}")
        return math.nan
    return float(value)


def read_policy(path: Path) -> AuditPolicy:
    """The limits in a node's policy file; ConfigError naming the file for anything wrong."""
    try:
        if path.stat().st_size > MAX_POLICY_BYTES:
            raise ConfigError(f"policy file {path} is larger than {MAX_POLICY_BYTES} bytes")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"policy file {path} cannot be read: {err.strerror or err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"policy file {path} is not valid TOML: {err}") from err
    problems: list[str] = []
    budget = _number(raw, "max-epsilon", None, path, problems)
    delta = _number(raw, "delta", DEFAULT_DELTA, path, problems)
    accountant, dataset = raw.get("accountant", DEFAULT_ACCOUNTANT), raw.get("dataset-id", "")
    for key, value in (("accountant", accountant), ("dataset-id", dataset)):
        if not isinstance(value, str):
            problems.append(f"{path}: {key} must be a string, got {value!r}")
    if problems:
        raise ConfigError(problems)
    return AuditPolicy(budget, delta, str(accountant), str(dataset), str(path))
