"""The node's policy file: parsing with every problem at once, and checks against the server's plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.client.policy import NodePolicy, PlanRequest, load_policy, simulation_default
from fedtune.client.sim_nodes import SimulationNodes
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
    assert policy.budget_key("f" * 64) == "ward-7-notes"
    assert policy.source == str(tmp_path / "policy.toml")


def test_every_problem_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'delta = "small"\nmax-steps = 3\nrequire-dp = 1\n')
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    problems = err.value.problems
    assert len(problems) == 4 and all(str(path) in p for p in problems)
    text = "\n".join(problems)
    for fragment in ("unknown key 'max-steps'", "max-epsilon is required", "delta must be a number",
                     "require-dp must be true or false"):
        assert fragment in text


@pytest.mark.parametrize(("text", "fragment"), [
    ("max-epsilon = -1", "max-epsilon must be > 0"),
    ("max-epsilon = 1\ndelta = 2.0", "delta must be in (0, 1)"),
    ("max-epsilon = 1\nnoise-plan = 'greedy'", "noise-plan must be spread or as-requested"),
    ("max-epsilon = 1\naccountant = 'gdp'", "accountant must be prv or rdp"),
    ("max-epsilon = [", "not valid TOML"),
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
    (NodePolicy(allowed_models=("/models/gpt",)), REQUEST, "'embedded' is not in the policy's"),
])
def test_check_against_the_plan(policy: NodePolicy, request_: PlanRequest, fragment: str | None) -> None:
    problems = policy.check(request_)
    assert (problems == []) if fragment is None else any(fragment in p for p in problems), problems


def test_rounds_left_counts_from_this_round() -> None:
    assert replace(REQUEST, server_round=1).rounds_left == 3
    assert replace(REQUEST, server_round=3).rounds_left == 1
    assert replace(REQUEST, server_round=7).rounds_left == 1


def test_simulation_default_takes_the_run_budget() -> None:
    policy = simulation_default(3.0, 1e-6, "rdp", dp=False)
    assert (policy.max_epsilon, policy.delta, policy.accountant, policy.require_dp) == (3.0, 1e-6, "rdp", False)


def test_simulation_nodes_file(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "client-1.toml").write_text("max-epsilon = 1\n")
    (policies / "default.toml").write_text("max-epsilon = 2\n")
    SimulationNodes(policies, tmp_path / "state").write(tmp_path / "out")
    nodes = SimulationNodes.read(tmp_path / "out")
    assert nodes.policy_file(1) == (policies / "client-1.toml").resolve()
    assert nodes.policy_file(0) == (policies / "default.toml").resolve()
    assert nodes.client_state_dir(tmp_path / "out", 3) == (tmp_path / "state" / "client-3").resolve()
    assert SimulationNodes.read(tmp_path / "elsewhere").client_state_dir(tmp_path, 0) == tmp_path / "clients/client-0"
