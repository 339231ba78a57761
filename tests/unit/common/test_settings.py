"""Settings: one parse at the edge, every problem reported, defaults in sync with pyproject."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtune.common.errors import ConfigError
from fedtune.common.settings import RunSettings

ROOT = Path(__file__).resolve().parents[3]


def test_pyproject_app_config_equals_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == RunSettings().to_config()


def test_round_trip_through_flat_config():
    settings = RunSettings.from_config({"lora-rank": "4", "dp": "false", "epsilon": 2, "partitioner": "iid"})
    assert settings.lora.lora_rank == 4 and settings.privacy.dp is False and settings.privacy.epsilon == 2.0
    assert RunSettings.from_config(settings.to_config()) == settings


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epsilon", 0, "epsilon must be > 0"),
    ("epsilon", -1.5, "epsilon must be > 0"),
    ("lora-rank", 0, "lora-rank must be > 0"),
    ("lora-rank", "two", "lora-rank must be an integer"),
    ("delta", 1.0, "delta must be in (0, 1)"),
    ("partitioner", "random", "partitioner must be one of"),
    ("dp", "maybe", "dp must be true or false"),
    ("batch-size", 2.5, "batch-size must be an integer"),
    ("no-such-key", 1, "unknown setting 'no-such-key'"),
])
def test_bad_values_name_the_setting(key, value, message):
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config({key: value})
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config({"epsilon": -1, "lora-rank": 0, "test-fraction": 2})
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(("config", "mode"), [
    ({}, "dp"), ({"dp-mode": "clip-only"}, "clip-only"), ({"dp": "false"}, "off"), ({"dp": True}, "dp"),
    ({"dp": False, "dp-mode": "clip-only"}, "clip-only"),  # both non-private: the older key agrees
])
def test_dp_mode_and_the_older_dp_key(config, mode):
    privacy = RunSettings.from_config(config).privacy
    assert privacy.dp_mode == mode and privacy.dp is (mode == "dp")


@pytest.mark.parametrize(("config", "message"), [
    ({"dp": True, "dp-mode": "off"}, "dp=true contradicts dp-mode='off'"),
    ({"dp-mode": "noisy"}, "dp-mode must be one of dp, clip-only, off"),
    ({"divergence-factor": 0.5}, "divergence-factor must be 0 (off) or > 1"),
    ({"nonprivate-learning-rate": 0}, "nonprivate-learning-rate must be > 0"),
    ({"nonprivate-optimizer": "lion"}, "nonprivate-optimizer must be one of sgd, adamw"),
    ({"weighting": "median"}, "weighting must be one of examples, equal, got 'median'"),
    ({"max-node-examples": -5}, "max-node-examples must be >= 0 (0 = 4 x the round's median), got -5"),
    ({"max-node-examples": "many"}, "max-node-examples must be an integer, got 'many'"),
])
def test_bad_privacy_modes_and_baseline_settings_are_named(config, message):
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config(config)
    assert message in str(err.value)


def test_aggregation_weighting_round_trips_and_defaults_to_bounded_examples():
    assert (RunSettings().federation.weighting, RunSettings().federation.max_node_examples) == ("examples", 0)
    settings = RunSettings.from_config({"weighting": "equal", "max-node-examples": "2000"})
    assert settings.federation.weighting == "equal" and settings.federation.max_node_examples == 2000
    assert RunSettings.from_config(settings.to_config()) == settings
    assert settings.to_config()["weighting"] == "equal" and settings.to_config()["max-node-examples"] == 2000

