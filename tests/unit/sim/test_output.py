"""The results directory: a run that never started leaves nothing that blocks the next one; results stay safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.common.errors import ConfigError
from fedtune.sim.output import ResultsDir, holds_results


def _leftover(path: Path) -> Path:
    """What an older fedtune-sim left when preflight failed: the resolved settings, a node's key, the app."""
    (path / "clients" / "client-0").mkdir(parents=True)
    (path / "clients" / "client-0" / "ledger-signing.key").write_text("key")
    (path / "flower" / "app").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"num-clients": 1, "dataset": "news.csv"}))
    return path


def test_a_run_that_never_started_is_discarded_and_the_same_out_can_be_claimed_again(tmp_path):
    out = tmp_path / "central"
    results = ResultsDir.claim(out, overwrite=False)
    (results.work / "config.json").write_text(json.dumps({"num-clients": 1}))
    (results.work / "flower").mkdir()
    (results.work / "flower" / "fedtune-sim.log").write_text("a library said something\n")
    assert not results.started
    results.discard()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    again = ResultsDir.claim(out, overwrite=False)  # the corrected command
    (again.work / "summary.json").write_text("{}")
    assert again.finish() == out.absolute() and (out / "summary.json").is_file()


def test_the_leftover_of_a_run_that_never_started_is_not_taken_for_results(tmp_path):
    out = _leftover(tmp_path / "central")
    assert not holds_results(out)
    results = ResultsDir.claim(out, overwrite=False)
    (results.work / "metrics.jsonl").write_text("{}\n")
    assert results.finish() == out.absolute()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # the leftover went, the new run is there


@pytest.mark.parametrize("content", [
    {"metrics.jsonl": "{}\n"},
    {"summary.json": "{}"},
    {"clients/client-0/ledger.jsonl": "{}\n"},  # a node was charged: never thrown away
    {"notes.txt": "mine"},  # not something fedtune-sim writes
    {"config.json": '{"learning_rate": 3}'},  # someone else's config.json
])
def test_a_directory_with_results_or_foreign_files_is_refused(tmp_path, content):
    out = _leftover(tmp_path / "run") if "config.json" not in content else tmp_path / "run"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    assert holds_results(out)
    with pytest.raises(ConfigError, match="already holds results"):
        ResultsDir.claim(out, overwrite=False)


def test_a_run_that_started_is_kept_when_it_fails(tmp_path):
    out = tmp_path / "run"
    results = ResultsDir.claim(out, overwrite=False)
    (results.work / "clients" / "client-0").mkdir(parents=True)
    (results.work / "clients" / "client-0" / "ledger.jsonl").write_text("{}\n")
    assert results.started
    assert results.finish(completed=False) == out.absolute()
    assert (out / "clients" / "client-0" / "ledger.jsonl").is_file()
