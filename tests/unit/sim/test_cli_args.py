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


def test_a_ray_address_must_be_host_and_port():
    assert _settings("--ray-address", "10.0.0.5:6379").federation is not None
    with pytest.raises(ConfigError, match="--ray-address expects HOST:PORT"):
        _settings("--ray-address", "my-cluster")


def test_the_aggregation_settings_are_in_fedtune_sim_help():
    from fedtune.sim.cli import parser

    text = parser().format_help()
    assert "weighting (default 'examples'):" in text and "max-node-examples (default 0):" in text
    assert "4 x the median" in text
