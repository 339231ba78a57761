"""The node's privacy policy: a TOML file on the node's own disk that the server cannot override.

The server's per-run plan (epsilon, delta, rounds, local epochs, batch size, clip
norm, accountant) is a *request*. :meth:`NodePolicy.check` lists every way a
request falls outside the policy; the client refuses such a round and records
the refusal in its ledger. Example (all keys optional except ``max-epsilon``)::

    max-epsilon = 8.0            # lifetime budget of this dataset, across all runs
    delta = 1e-5                 # delta every epsilon is accounted at
    min-noise-multiplier = 0.8   # refuse plans that would need less noise
    max-noise-multiplier = 10.0  # refuse when the remaining budget only allows more noise (no utility left)
    max-steps-per-round = 200    # refuse plans with more local DP-SGD steps per round
    max-seq-len = 256            # refuse requests for longer sequences (0 = no limit)
    fixed-shape = false          # pad training batches to max-seq-len: time does not depend on row lengths
    allowed-models = ["embedded", "/models/bert-base-uncased"]
    accountant = "prv"           # the node's accountant: prv or rdp (the server's choice is ignored)
    noise-plan = "spread"        # spread | as-requested (see NoisePlan)
    require-dp = true
    require-secure-aggregation = false  # refuse rounds whose updates the server would see one by one
    dataset-id = "oncology-notes-2026"  # required: the budget key (the server can neither set nor change it)
    release-train-loss = false   # send the round's training loss to the server (a disclosed leak)
    release-local-eval = false   # answer local-evaluation requests (a disclosed leak)
    ledger-key = ""              # Ed25519 PKCS#8 PEM (e.g. fedtune-certs' ledger-signing.key)
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from fedtune.common.errors import ConfigError

NoisePlan = Literal["spread", "as-requested"]
EMBEDDED_MODEL = "embedded"  # names the built-in all-MiniLM-L6-v2 (model-path = "")
EMBEDDED_NAME = "all-MiniLM-L6-v2"  # model-path naming it (fedtune.common.models.base.EMBEDDED_NAME)


@dataclass(frozen=True)
class PlanRequest:
    """What the server asks of this node for one round, as it bears on privacy."""

    model: str  # model-path requested ("" = embedded)
    dp: bool
    epsilon: float  # the run's requested per-client epsilon
    delta: float
    accountant: str
    num_rounds: int
    server_round: int
    sample_rate: float | None  # q of this node's Poisson sampler (None: refused before the rows were read)
    steps: int | None  # local DP-SGD steps this round (None: likewise)
    clip_norm: float
    dp_mode: str = "dp"  # dp | clip-only | off: how the server asks to train (only dp is private)
    max_seq_len: int = 0  # tokens per example the request asks for
    secure: bool = False  # the round came through Flower's SecAgg+ (the server sees only the sum of the updates)

    @property
    def rounds_left(self) -> int:
        """Rounds of this run from this one on (the node assumes it is sampled in each)."""
        return max(1, self.num_rounds - self.server_round + 1)


def _h(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class NodePolicy:
    """A node's privacy policy; every field can be set in the TOML file (kebab-case keys)."""

    max_epsilon: float = _h("Lifetime epsilon budget of the dataset, across rounds, runs and restarts.", 8.0)
    delta: float = _h("Delta all epsilons are accounted at; a request for a larger delta is refused.", 1e-5)
    min_noise_multiplier: float = _h("Refuse plans that need a smaller noise multiplier (0 = no floor).", 0.0)
    max_noise_multiplier: float = _h(
        "Refuse a round when the remaining budget only allows a larger noise multiplier: the update would be "
        "noise with no utility, and the budget is better kept.", 10.0)
    max_steps_per_round: int = _h("Refuse plans with more local DP-SGD steps per round (0 = no limit).", 0)
    max_seq_len: int = _h("Refuse requests whose max-seq-len is above this (0 = no limit): bounds the memory and time "
                          "one request can make the node spend. Checked before anything is read or charged.", 0)
    fixed_shape: bool = _h("Pad every training batch part to the request's max-seq-len (no dynamic padding), so that "
                           "a round's time and memory do not depend on the lengths of the rows drawn. Costs speed.",
                           False)
    allowed_models: tuple[str, ...] = _h("Base models this node trains ('embedded' or paths); empty = any.", ())
    accountant: str = _h("The node's accountant: prv or rdp. The server's request is ignored.", "prv")
    noise_plan: NoisePlan = _h(
        "spread: raise the noise so the whole run fits the remaining budget; as-requested: use the noise the "
        "server's requested epsilon implies and refuse once the budget is spent.", "spread")
    require_dp: bool = _h("Refuse to train without DP-SGD.", True)
    require_secure_aggregation: bool = _h(
        "Refuse rounds that do not come through secure aggregation (Flower's SecAgg+), in which the server would "
        "see this node's update on its own rather than only the sum over the round's nodes.", False)
    dataset_id: str = _h(
        "The budget key: names this node's dataset. Required for a deployed node (fedtune-client); nothing the "
        "server sends can change it. Keep it when rows are added or edited, so the old rows keep their budget.", "")
    release_train_loss: bool = _h("Send each round's mean training loss to the server (computed on private "
                                  "data without noise: a disclosed leak, recorded in every ledger entry).", False)
    release_local_eval: bool = _h("Hold out a local test split (node-secret seed) and answer the server's "
                                  "local-evaluation requests with loss and accuracy on it (a disclosed leak: an "
                                  "unaccounted query on weights the server chooses).", False)
    ledger_key: str = _h("Ed25519 private key (PKCS#8 PEM) signing the ledger; empty = <state-dir>/"
                         "ledger-signing.key, generated on first use.", "")
    source: str = _h("Where this policy came from (file path or a description).", "defaults")

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise ConfigError([f"{self.source}: {p}" for p in problems])

    def problems(self) -> list[str]:
        out = []
        if not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            out.append(f"max-epsilon must be > 0 and finite, got {self.max_epsilon!r}")
        if not 0.0 < self.delta < 1.0:
            out.append(f"delta must be in (0, 1), got {self.delta!r}")
        if not (self.min_noise_multiplier >= 0 and math.isfinite(self.min_noise_multiplier)):
            out.append(f"min-noise-multiplier must be >= 0, got {self.min_noise_multiplier!r}")
        if not (self.max_noise_multiplier > self.min_noise_multiplier and math.isfinite(self.max_noise_multiplier)):
            out.append(f"max-noise-multiplier must be finite and above min-noise-multiplier, "
                       f"got {self.max_noise_multiplier!r}")
        if self.max_steps_per_round < 0:
            out.append(f"max-steps-per-round must be >= 0, got {self.max_steps_per_round!r}")
        if self.max_seq_len < 0:
            out.append(f"max-seq-len must be >= 0, got {self.max_seq_len!r}")
        if self.accountant not in ("prv", "rdp"):
            out.append(f"accountant must be prv or rdp, got {self.accountant!r}")
        if self.noise_plan not in ("spread", "as-requested"):
            out.append(f"noise-plan must be spread or as-requested, got {self.noise_plan!r}")
        return out

    def check(self, request: PlanRequest) -> list[tuple[str, str]]:
        """Every way ``request`` falls outside this policy, as (refusal code, detail); empty = allowed.

        Noise is checked after planning (see ``client/budget.py``)."""
        out = self.request_problems(request)
        if self.max_steps_per_round and request.steps is not None and request.steps > self.max_steps_per_round:
            out.append(("POLICY_STEPS", f"the plan needs {request.steps} local steps per round; "
                                        f"the policy allows at most {self.max_steps_per_round}"))
        return out

    def request_problems(self, request: PlanRequest) -> list[tuple[str, str]]:
        """The checks that need only the request, not the node's rows: made before anything is read or charged."""
        out = []
        if self.require_dp and not request.dp:
            out.append(("POLICY_DP_REQUIRED", f"the plan asks for training without DP (dp-mode {request.dp_mode}); "
                                              "the policy requires DP-SGD"))
        if request.dp and request.delta > self.delta:
            out.append(("POLICY_DELTA", f"the plan asks for delta {request.delta:g}; the policy allows at most "
                                        f"{self.delta:g}"))
        if self.allowed_models and not self.allows_model(request.model):
            out.append(("POLICY_MODEL", f"base model {request.model or EMBEDDED_MODEL!r} is not in the policy's "
                                        f"allowed-models ({', '.join(self.allowed_models)})"))
        if self.require_secure_aggregation and not request.secure:
            out.append(("POLICY_SECURE_AGGREGATION", "the round is not securely aggregated; the policy requires "
                                                     "secure aggregation"))
        if self.max_seq_len and request.max_seq_len > self.max_seq_len:
            out.append(("POLICY_SEQ_LEN", f"the request asks for max-seq-len {request.max_seq_len}; the policy "
                                          f"allows at most {self.max_seq_len}"))
        return out

    @property
    def released(self) -> tuple[str, ...]:
        """Metrics this policy releases in plain text (recorded in every ledger entry)."""
        return tuple(name for name, on in (("train-loss", self.release_train_loss),
                                           ("local-eval", self.release_local_eval)) if on)

    def allows_model(self, model: str) -> bool:
        embedded = not model or (model == EMBEDDED_NAME and not Path(model).exists())  # as the model loader reads it
        for allowed in self.allowed_models:
            if allowed == EMBEDDED_MODEL and embedded:
                return True
            if model and (allowed == model or Path(allowed).expanduser().resolve() == Path(model).resolve()):
                return True
        return False



def _coerce(key: str, value: Any, default: Any) -> Any:
    """TOML value -> the field's type; raise ValueError naming the key."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{key} must be a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def load_policy(path: Path) -> NodePolicy:
    """Parse and validate a policy file; report every problem at once, naming the file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"policy file {path} cannot be read: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"policy file {path} is not valid TOML: {err}") from err
    defaults = {f.name.replace("_", "-"): f for f in fields(NodePolicy) if f.name != "source"}
    problems = [f"{path}: unknown key '{k}' (known: {', '.join(sorted(defaults))})" for k in raw if k not in defaults]
    for key, why in (("max-epsilon", "the dataset's lifetime budget"),
                     ("dataset-id", "the budget key, e.g. dataset-id = \"clinic-notes-2026\"")):
        if key not in raw:
            problems.append(f"{path}: {key} is required ({why})")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in defaults:
            try:
                kwargs[defaults[key].name] = _coerce(key, value, defaults[key].default)
            except ValueError as err:
                problems.append(f"{path}: {err}")
    try:  # the values' own checks too, so that one run reports everything
        NodePolicy(source=str(path), **kwargs)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    if kwargs.get("ledger_key"):
        kwargs["ledger_key"] = str((path.parent / Path(kwargs["ledger_key"]).expanduser()).resolve())
    return NodePolicy(source=str(path), **kwargs)


def policy_toml(policy: NodePolicy) -> str:
    """The TOML text of ``policy`` (fedtune-sim writes each simulated node's policy file with it)."""
    import tomli_w

    values = {f.name.replace("_", "-"): getattr(policy, f.name) for f in fields(NodePolicy) if f.name != "source"}
    return tomli_w.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
