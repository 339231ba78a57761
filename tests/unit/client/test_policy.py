"""The node's policy file: parsing with every problem at once, and checks against the server's plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.client.policy import NodePolicy, PlanRequest, load_policy, policy_toml
from fedtune.common.errors import ConfigError

REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3, server_round=1,
                      sample_rate=0.125, steps=8, clip_norm=1.0)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_full_policy_parses(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, """
max-epsilon = 4
delta = 1e-6
min-noise-multiplier = 0.8
max-steps-per-round = 100
allowed-models = ["embedded", "models/bert"]
accountant = "rdp"
noise-plan = "as-requested"
require-dp = true
dataset-id = "ward-7-notes"
ledger-key = "keys/ledger-signing.key"
"""))
    assert policy.max_epsilon == 4.0 and policy.delta == 1e-6 and policy.accountant == "rdp"
    assert policy.allowed_models == ("embedded", "models/bert")
    assert policy.ledger_key == str((tmp_path / "keys/ledger-signing.key").resolve())  # relative to the file
    assert policy.dataset_id == "ward-7-notes" and policy.released == ()
    assert policy.source == str(tmp_path / "policy.toml")


def test_every_problem_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'delta = "small"\nmax-steps = 3\nrequire-dp = 1\n')
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    problems = err.value.problems
    assert len(problems) == 5 and all(str(path) in p for p in problems)
    text = "\n".join(problems)
    for fragment in ("unknown key 'max-steps'", "max-epsilon is required", "dataset-id is required",
                     "delta must be a number", "require-dp must be true or false"):
        assert fragment in text


@pytest.mark.parametrize(("text", "fragment"), [
    ("max-epsilon = -1\ndataset-id = 'd'", "max-epsilon must be > 0"),
    ("max-epsilon = 1\ndelta = 2.0\ndataset-id = 'd'", "delta must be in (0, 1)"),
    ("max-epsilon = 1\nnoise-plan = 'greedy'\ndataset-id = 'd'", "noise-plan must be spread or as-requested"),
    ("max-epsilon = 1\naccountant = 'gdp'\ndataset-id = 'd'", "accountant must be prv or rdp"),
    ("max-epsilon = [", "not valid TOML"),
    ("max-epsilon = 1\nmax-noise-multiplier = 0.5\nmin-noise-multiplier = 0.8\ndataset-id = 'd'",
     "max-noise-multiplier must be finite and above min-noise-multiplier"),
    ("max-epsilon = 1", "dataset-id is required"),
])
def test_bad_values(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_policy(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_policy(tmp_path / "absent.toml")


@pytest.mark.parametrize(("policy", "request_", "fragment"), [
    (NodePolicy(), REQUEST, None),
    (NodePolicy(), replace(REQUEST, dp=False), "requires DP-SGD"),
    (NodePolicy(require_dp=False), replace(REQUEST, dp=False), None),
    (NodePolicy(delta=1e-6), REQUEST, "delta 1e-05; the policy allows at most 1e-06"),
    (NodePolicy(delta=1e-4), REQUEST, None),  # a stricter delta than the policy's is fine
    (NodePolicy(max_steps_per_round=5), REQUEST, "needs 8 local steps per round; the policy allows at most 5"),
    (NodePolicy(allowed_models=("embedded",)), REQUEST, None),
    (NodePolicy(allowed_models=("embedded",)), replace(REQUEST, model="/models/gpt"), "not in the policy's"),
    (NodePolicy(allowed_models=("embedded",)), replace(REQUEST, model="all-MiniLM-L6-v2"), None),  # it, by name
    (NodePolicy(allowed_models=("embedded",)), replace(REQUEST, model="all-mpnet-base-v2"), "not in the policy's"),
    (NodePolicy(allowed_models=("/models/gpt",)), REQUEST, "'embedded' is not in the policy's"),
])
def test_check_against_the_plan(policy: NodePolicy, request_: PlanRequest, fragment: str | None) -> None:
    problems = policy.check(request_)
    assert (problems == []) if fragment is None else any(fragment in p for _, p in problems), problems
    assert all(code.startswith("POLICY_") for code, _ in problems)


def test_rounds_left_counts_from_this_round() -> None:
    assert replace(REQUEST, server_round=1).rounds_left == 3
    assert replace(REQUEST, server_round=3).rounds_left == 1
    assert replace(REQUEST, server_round=7).rounds_left == 1


def test_policy_round_trips_through_toml(tmp_path: Path) -> None:
    policy = NodePolicy(max_epsilon=3.0, delta=1e-6, accountant="rdp", dataset_id="sim/client-1",
                        release_train_loss=True, allowed_models=("embedded",))
    again = load_policy(write(tmp_path, policy_toml(policy)))
    assert again == NodePolicy(**{**policy.__dict__, "source": str(tmp_path / "policy.toml")})
    assert again.released == ("train-loss",)
