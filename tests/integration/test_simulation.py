"""fedtune-sim end to end through Flower's real simulation engine (Ray), on a tiny model (the default suite's
federation is the README quick start's non-private run: tests/integration/test_quickstart.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtune.sim.cli import main


def _common_args(tiny_model_dir, sentiment_csv, out):
    return ["--clients", "3", "--rounds", "2", "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv),
            "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32",
            "--out", str(out)]


@pytest.mark.slow
def test_dp_run_reports_epsilon_within_budget(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "dp"
    code = main([*_common_args(tiny_model_dir, sentiment_csv, out), "--epsilon", "3", "--rounds", "2"])
    assert code == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [c["epsilon"] for r in rounds[1:] for c in r["clients"]]
    assert len(eps) == 6 and all(0 < e <= 3.0 for e in eps)
    assert rounds[2]["epsilon-max"] > rounds[1]["epsilon-max"]  # composition across rounds


@pytest.mark.parametrize(("extra", "message"), [
    (["--dataset", "/nonexistent/data.csv"], "does not exist"),
    (["--set", "label-column=sentiment"], "column 'sentiment' (label-column) is missing"),
    (["--set", "labels=neg,positive"], "has label 'pos'"),
    (["--epsilon", "0"], "epsilon must be > 0"),
    (["--lora-rank", "0"], "lora-rank must be > 0"),
    (["--set", "epsilon"], "--set expects KEY=VALUE"),
    (["--model", "/nonexistent/model"], "not a Hugging Face model directory"),
    (["--set", "lora-targets=attention_nope"], "check lora-targets"),
])
def test_operator_mistakes_exit_nonzero(tiny_model_dir, sentiment_csv, tmp_path, capsys, extra, message):
    args = ["--model", str(tiny_model_dir), "--dataset", str(sentiment_csv), "--set", "partition-by=group",
            "--out", str(tmp_path / "x"), *extra]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


@pytest.mark.parametrize(("content", "message"), [
    (b"text,label,group\n", "no examples"),
    (b"text,label,group\nfine film,pos,g1\ncaf\xe9 bad,neg,g2\n", "not valid UTF-8"),
])
def test_bad_data_files_exit_nonzero(tiny_model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "bad.csv"
    data.write_bytes(content)
    assert main(["--model", str(tiny_model_dir), "--dataset", str(data), "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.slow
def test_a_run_that_fails_inside_flower_exits_nonzero(tiny_model_dir, sentiment_csv, tmp_path, capsys, monkeypatch):
    """`flwr run --stream` would exit 0 here; fedtune-sim checks the run's real status."""
    monkeypatch.setenv("FEDTUNE_DEVICE", "no-such-device")  # inherited by the ServerApp: it fails at start
    out = tmp_path / "failed"
    assert main([*_common_args(tiny_model_dir, sentiment_csv, out), "--rounds", "1"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "finished:failed" in err and "no-such-device" in err
    assert not (out / "summary.json").exists()


def test_the_console_script_exits_nonzero_with_one_message(tmp_path):
    """The real process: exit code 2, the message, no traceback."""
    cmd = [sys.executable, "-m", "fedtune.sim.cli", "--dataset", str(tmp_path / "missing.csv"), "--epsilon", "-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "epsilon must be > 0" in proc.stderr and "Traceback" not in proc.stderr
