"""Settings that have no effect in the chosen mode are named once, with what applies instead."""

from __future__ import annotations

import pytest

from fedtune.sim.applicability import Mode, inert_settings
from fedtune.sim.cli import given_settings, parser, settings_from_args


def _warnings(*argv: str) -> list[str]:
    args = parser().parse_args(list(argv))
    given = given_settings(args)
    settings = settings_from_args(args)
    return list(inert_settings(Mode(settings, args.central, args.clients), given).values())


@pytest.mark.parametrize(("argv", "setting", "applies"), [
    (["--no-dp", "--set", "learning-rate=500"], "learning-rate=500.0", "nonprivate-learning-rate (now 0.005)"),
    (["--no-dp", "--set", "optimizer=adamw"], "optimizer='adamw'", "nonprivate-optimizer"),
    (["--no-dp", "--set", "lora-lr-scale=1"], "lora-lr-scale=1.0", "nonprivate-lora-lr-scale"),
    (["--set", "nonprivate-learning-rate=0.1"], "nonprivate-learning-rate=0.1", "trains with learning-rate (now 2.0)"),
    (["--dp-mode", "clip-only", "--set", "nonprivate-optimizer=sgd"], "nonprivate-optimizer='sgd'",
     "trains with optimizer"),
    (["--no-dp", "--epsilon", "4"], "epsilon=4.0", "applies with dp-mode dp"),
    (["--dp-mode", "clip-only", "--delta", "1e-6"], "delta=1e-06", "applies with dp-mode dp"),
    (["--no-dp", "--set", "clip-norm=2"], "clip-norm=2.0", "applies with dp-mode dp or clip-only"),
    (["--central", "--partitioner", "dirichlet"], "partitioner='dirichlet'", "the whole training pool"),
    (["--central", "--set", "partition-by=newsroom"], "partition-by='newsroom'", "the whole training pool"),
    (["--clients", "1", "--alpha", "0.1"], "dirichlet-alpha=0.1", "federated runs of two or more clients"),
    (["--partitioner", "iid", "--set", "partition-by=newsroom"], "partition-by='newsroom'",
     "applies with --partitioner natural"),
    (["--partitioner", "natural", "--alpha", "0.1"], "dirichlet-alpha=0.1", "applies with --partitioner dirichlet"),
    (["--central", "--set", "weighting=equal"], "weighting='equal'", "num-rounds and local-epochs"),
    (["--set", "weighting=equal", "--set", "max-node-examples=100"], "max-node-examples=100",
     "applies with weighting examples"),
    (["--central", "--clients", "4"], "--clients", "one node trained in this process"),
    (["--central", "--cpus-per-client", "2"], "--cpus-per-client", "without Flower or Ray"),
])
def test_a_given_setting_without_effect_gets_one_warning_naming_what_applies(argv, setting, applies):
    warnings = _warnings(*argv)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{setting} has no effect with ") and applies in warnings[0]


@pytest.mark.parametrize("argv", [
    [],  # defaults are not the researcher's choice
    ["--task", "sft"],  # nor a task's preset job (it sets learning rates for both modes)
    ["--no-dp", "--set", "nonprivate-learning-rate=0.01", "--rounds", "2"],
    ["--set", "learning-rate=1", "--epsilon", "4", "--set", "clip-norm=0.5"],
    ["--dp-mode", "clip-only", "--set", "clip-norm=0.5", "--set", "learning-rate=1"],
    ["--partitioner", "dirichlet", "--alpha", "0.1", "--clients", "3"],
    ["--set", "partition-by=newsroom", "--clients", "3"],
    ["--central", "--no-dp", "--rounds", "2", "--local-epochs", "2", "--set", "test-fraction=0.2"],
    ["--set", "max-node-examples=100"],
])
def test_settings_that_apply_give_no_warning(argv):
    assert _warnings(*argv) == []


def test_each_setting_is_named_once_even_when_given_twice_and_for_two_reasons():
    warnings = _warnings("--central", "--no-dp", "--epsilon", "4", "--set", "epsilon=4.0", "--partitioner", "iid",
                         "--set", "partition-by=newsroom", "--set", "learning-rate=3")
    assert [w.split(" ")[0] for w in warnings] == ["epsilon=4.0", "partitioner='iid'", "partition-by='newsroom'",
                                                   "learning-rate=3.0"]


@pytest.mark.parametrize(("argv", "warned"), [
    (["--set", "learning-rate=1"], []),  # used by the DP points, not by epsilon=inf: the grid's design
    (["--set", "nonprivate-learning-rate=0.01"], []),  # used by the epsilon=inf points
    (["--baseline", "clip-only", "--set", "nonprivate-learning-rate=0.01"], ["nonprivate-learning-rate=0.01"]),
    (["--partitioner", "iid"], []),  # the federated points split; only the central reference does not
    (["--modes", "central", "--partitioner", "iid"], ["partitioner='iid'"]),
])
def test_a_sweep_names_the_options_without_effect_in_every_point(argv, warned, tmp_path):
    from fedtune.sim.sweep import _check_sim_options, build

    sweep, _ = build(["--epsilon", "1,inf", "--repeats", "1", "--out", str(tmp_path), *argv])
    assert [w.split(" ")[0] for w in _check_sim_options(sweep)] == warned
