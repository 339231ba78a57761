"""A researcher's first runs on their own CSV: a mistake leaves nothing in the way of the corrected command, a
setting without effect is named once, and the terminal shows fedtune's output only (tiny model, central runs:
no Flower process, a few seconds each)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.common import exit_codes
from fedtune.sim.cli import main

THIRD_PARTY_BARS = ("Loading weights", "Casting the dataset", "Flattening the indices", "it/s]", "examples/s]", "%|")
LONG_FLOAT = re.compile(r"\d\.\d{5,}")  # the table and the verdict print at most 4 decimals


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory: pytest.TempPathFactory, sentiment_csv: Path) -> Path:
    """The researcher's own file: text and label, and no movie_name column for the default partitioner."""
    import pandas as pd

    path = tmp_path_factory.mktemp("own") / "news.csv"
    pd.read_csv(sentiment_csv)[["text", "label"]].head(240).to_csv(path, index=False)
    return path


def _small(model: Path) -> list[str]:
    return ["--model", str(model), "--set", "max-seq-len=16", "--set", "batch-size=32", "--rounds", "1"]


def test_a_preflight_failure_leaves_no_out_directory_and_the_corrected_command_succeeds(
        tiny_model_dir, news_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = _small(tiny_model_dir)
    # The default partitioner groups by movie_name, which this file does not have: found before anything runs.
    assert main(["--dataset", str(news_csv), "--no-dp", "--out", "run", *small]) == exit_codes.BAD_INPUT
    assert "--partitioner iid" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []
    assert main(["--dataset", str(news_csv), "--central", "--no-dp", "--set", "label-column=topic", "--out", "run",
                 *small]) == exit_codes.BAD_INPUT
    assert list(tmp_path.iterdir()) == []
    assert main(["--dataset", str(news_csv), "--central", "--no-dp", "--out", "run", *small]) == exit_codes.OK
    assert (tmp_path / "run" / "summary.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_setting_without_effect_is_named_once_and_the_run_goes_on_with_a_quiet_terminal(
        tiny_model_dir, news_csv, tmp_path):
    """The real process, as a researcher sees it: stdout and stderr together."""
    cmd = [sys.executable, "-m", "fedtune.sim.cli", "--dataset", str(news_csv), "--central", "--no-dp",
           "--set", "learning-rate=500", "--out", str(tmp_path / "central"), *_small(tiny_model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == exit_codes.OK, proc.stderr[-2000:]
    terminal = " ".join((proc.stdout + proc.stderr).split())
    assert terminal.count("learning-rate") == 2, terminal  # one warning, naming it and what applies
    assert "warning: learning-rate=500.0 has no effect with --no-dp (dp-mode off): non-private training uses " \
           "nonprivate-learning-rate (now 0.005)" in terminal
    assert not [bar for bar in THIRD_PARTY_BARS if bar in terminal], terminal
    assert not LONG_FLOAT.findall(terminal), terminal
    assert re.search(r"final held-out accuracy \d\.\d{4} \(majority class 'neg': \d\.\d{4}\)", terminal), terminal
    assert (tmp_path / "central" / "flower" / "fedtune-sim.log").is_file()


def test_verbose_shows_the_libraries_progress_bars(tiny_model_dir, news_csv, tmp_path, capsys):
    assert main(["--dataset", str(news_csv), "--central", "--no-dp", "--verbose", "--out", str(tmp_path / "v"),
                 *_small(tiny_model_dir)]) == exit_codes.OK
    assert "Casting the dataset" in capsys.readouterr().err  # the model may be cached in this process: no loading
