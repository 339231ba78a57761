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
    assert (best.plan.num_rounds, best.plan.local_epochs) == (2, 2.0)
    mine = _settings("--preset", "best", "--set", "lora-layers=-2,-1", "--rounds", "5")
    assert mine.lora.lora_layers == "-2,-1" and mine.plan.num_rounds == 5 and mine.lora.lora_targets == "q,v"
    with pytest.raises(ConfigError, match="--preset best is a recipe of the classify job"):
        _settings("--preset", "best", "--task", "ner")


def test_the_main_job_is_the_mpnet_recipe_and_your_model_or_data_drops_what_is_tied_to_it(tmp_path):
    job = _settings()
    assert (job.model.model_path, job.lora.lora_targets, job.lora.lora_layers) == ("all-mpnet-base-v2", "q,v", "-1")
    assert job.data.max_train_examples == 2000 and job.federation.fraction_evaluate == 0.0
    assert job.plan.num_rounds == 2 and job.plan.local_epochs == 2.0
    assert _settings("--model", str(tmp_path)).plan.num_rounds == 3
    # your own model: the settings' defaults (BERT-style targets, the top two layers, every example)
    mine = _settings("--model", str(tmp_path))
    assert (mine.lora.lora_targets, mine.lora.lora_layers, mine.data.max_train_examples) == ("query,value",
                                                                                              "-2,-1", 0)
    minilm = _settings("--model", "all-MiniLM-L6-v2")  # the embedded model by name: the previous main job
    assert (minilm.lora.lora_targets, minilm.data.max_train_examples) == ("query,value", 0)
    # the registry model by name gets its own module names unless the run names its own
    assert _settings("--model", "all-mpnet-base-v2").lora.lora_targets == "q,v"
    assert _settings("--set", "lora-targets=q,k,v").lora.lora_targets == "q,k,v"
    # your own data: the job's model recipe stays, its cap on the built-in corpus does not
    (tmp_path / "mine.csv").write_text("text,label\na,pos\n")
    data = _settings("--dataset", str(tmp_path / "mine.csv"))
    assert data.model.model_path == "all-mpnet-base-v2" and data.data.max_train_examples == 0
    assert _settings("--max-train-examples", "500").data.max_train_examples == 500
