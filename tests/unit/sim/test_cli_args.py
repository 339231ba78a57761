"""fedtune-sim's arguments: built-in corpus names and paths."""

from __future__ import annotations

import pytest

from fedtune.common.errors import ConfigError
from fedtune.sim.cli import parser, settings_from_args


def _settings(*argv: str):
    return settings_from_args(parser().parse_args(list(argv)))


def test_a_directory_named_like_a_builtin_corpus_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drug-reviews").mkdir()  # e.g. fedtune-sweep --out drug-reviews --dataset drug-reviews
    assert _settings("--dataset", "drug-reviews").data.dataset == "drug-reviews"
    (tmp_path / "mine.csv").write_text("text,label\na,pos\n")
    assert _settings("--dataset", "mine.csv").data.dataset == str((tmp_path / "mine.csv").resolve())


@pytest.mark.parametrize("address", ["10.0.0.5:6379", "head.cluster.local:6379", "ray://10.0.0.5:10001",
                                     "[::1]:6379"])
def test_a_ray_address_of_host_and_port_is_accepted_and_changes_no_run_setting(address):
    args = parser().parse_args(["--ray-address", address])
    assert settings_from_args(args) == _settings()  # where the nodes run, not what they compute
    assert args.ray_address == address  # handed to Ray as given (RAY_ADDRESS)


@pytest.mark.parametrize("address", ["my-cluster", "10.0.0.5", "10.0.0.5:", ":6379", "10.0.0.5:port",
                                     "http://10.0.0.5:6379", "10.0.0.5:6379 --x"])
def test_a_ray_address_must_be_host_and_port(address):
    with pytest.raises(ConfigError, match="--ray-address expects HOST:PORT"):
        _settings("--ray-address", address)


def test_the_aggregation_settings_are_in_fedtune_sim_help():
    from fedtune.sim.cli import parser

    text = parser().format_help()
    assert "weighting (default 'examples'):" in text and "max-node-examples (default 0):" in text
    assert "4 x the median" in text


def test_the_best_preset_is_the_measured_recipe_under_every_flag_and_set():
    best = _settings("--preset", "best")
    assert (best.model.model_path, best.lora.lora_targets, best.lora.lora_layers) == ("all-mpnet-base-v2", "q,v", "-1")
    assert best.federation.fraction_evaluate == 0.0 and best.data.max_train_examples == 0
    mine = _settings("--preset", "best", "--set", "lora-layers=-2,-1", "--rounds", "5")
    assert mine.lora.lora_layers == "-2,-1" and mine.plan.num_rounds == 5 and mine.lora.lora_targets == "q,v"
    with pytest.raises(ConfigError, match="--preset best is a recipe of the classify job"):
        _settings("--preset", "best", "--task", "ner")
