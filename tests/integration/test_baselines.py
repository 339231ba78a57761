"""Baselines end to end on a tiny model: the non-private modes, the central baseline and the divergence guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.client.node_data import LOCAL_TEST_FRACTION
from fedtune.common import exit_codes
from fedtune.common.data.table import federation_split
from fedtune.common.settings import DataSettings
from fedtune.common.tasks.classify.data import load_labelled
from fedtune.sim.cli import main


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--set", "partition-by=group", "--set", "max-seq-len=16",
            "--set", "batch-size=32", "--out", str(out), *extra]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_federated_dp_run_that_diverges_stops_with_exit_5_and_keeps_its_ledger_charges(
        tiny_model_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "diverged"
    code = main(_args(tiny_model_dir, sentiment_csv, out, "--clients", "2", "--rounds", "3",
                      "--set", "learning-rate=1000", "--set", "lora-lr-scale=1"))
    assert code == exit_codes.DIVERGED == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped-early" and summary["stop-code"] == "diverged"
    assert "stays charged in their ledgers" in summary["stop-reason"]
    lines = _lines(out)
    stopped = lines[-1]["round"]
    assert stopped < 3 and summary["adapter-round"] == stopped - 1  # nothing evaluated after the divergence
    assert f"after round {stopped}" in summary["stop-reason"]
    ledgers = sorted((out / "clients").glob("client-*/ledger.jsonl"))
    assert [p.parent.name for p in ledgers] == ["client-0", "client-1"], ledgers  # both nodes keep their charges
    for ledger in ledgers:
        charged = [json.loads(x) for x in ledger.read_text().splitlines() if '"charged"' in x]
        assert len(charged) == stopped and all(0 < e["epsilon"] <= 8.0 for e in charged)
    err = " ".join(capsys.readouterr().err.split())
    assert "stopped early: training diverged" in err and "majority class" in err


@pytest.mark.slow
def test_central_baseline_trains_on_the_whole_pool_and_no_dp_is_not_worse_than_dp(tiny_model_dir, sentiment_csv,
                                                                                   tmp_path):
    # Repeatable sampling and noise. On this tiny task both modes saturate within a few points of each other (either
    # can be ahead by a held-out example or two), so the check is "not worse beyond that", not "strictly better".
    common = ("--central", "--rounds", "2", "--local-epochs", "2", "--set", "learning-rate=0.5",
              "--insecure-reproducible-seed", "7")
    dp, no_dp = tmp_path / "central-dp", tmp_path / "central-no-dp"
    assert main(_args(tiny_model_dir, sentiment_csv, dp, *common)) == 0
    assert main(_args(tiny_model_dir, sentiment_csv, no_dp, *common, "--no-dp")) == 0
    pool, test = federation_split(load_labelled(DataSettings(dataset=str(sentiment_csv))), 0.15, 42, 6000)
    summaries = {p: json.loads((p / "summary.json").read_text()) for p in (dp, no_dp)}
    for path, summary in summaries.items():
        lines = _lines(path)
        assert summary["mode"] == "central" and summary["status"] == "completed" and len(lines) == 3
        # the whole pool less the node's local test split, the share every simulated node keeps back
        trained = len(pool.dataset) - math.ceil(LOCAL_TEST_FRACTION * len(pool.dataset))
        assert [c["num-examples"] for line in lines[1:] for c in line["clients"]] == [trained] * 2
        assert lines[-1]["num-examples"] == len(test.dataset)  # the federated run's held-out set
    assert 0 < summaries[dp]["epsilon-max"] <= 8.0 and summaries[no_dp]["epsilon-max"] == float("inf")
    assert summaries[no_dp]["final-accuracy"] >= summaries[dp]["final-accuracy"] - 0.05  # 90 held-out examples
    assert summaries[no_dp]["final-accuracy"] > summaries[no_dp]["majority-accuracy"]


def test_an_absurd_non_private_learning_rate_stops_the_central_run_as_diverged(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "absurd"
    code = main(_args(tiny_model_dir, sentiment_csv, out, "--central", "--no-dp", "--rounds", "3",
                      "--set", "nonprivate-learning-rate=500"))
    assert code == exit_codes.DIVERGED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop-code"] == "diverged" and "non-private (unbounded epsilon)" in summary["stop-reason"]
    assert summary["adapter-round"] == 0 and len(_lines(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["rotten-tomatoes", "drug-reviews"])
@pytest.mark.parametrize("mode", [["--no-dp"], ["--dp-mode", "clip-only"]])
def test_the_non_private_modes_do_not_diverge_on_real_corpora(corpus, mode, tmp_path):
    """The embedded MiniLM on the built-in corpora (fetched once from the package registry), central, small."""
    out = tmp_path / "run"
    code = main(["--dataset", corpus, "--model", "all-MiniLM-L6-v2", "--partitioner", "iid", "--central", *mode,
                 "--rounds", "2", "--max-train-examples", "300",
                 "--set", "max-seq-len=32", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["status"] == "completed", summary.get("stop-reason")
    losses = [line["loss"] for line in _lines(out)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 3 * losses[0]
