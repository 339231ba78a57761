"""A run resumed from its round-1 checkpoint ends exactly like the uninterrupted run (simulation engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.common.runtime import CHECKPOINT_DIR
from fedtune.server.checkpoint import LATEST
from fedtune.sim.cli import main

pytestmark = pytest.mark.slow  # two federations (~1 min on 2 cores); make test-all


def test_resumed_run_ends_like_the_uninterrupted_one(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "run"
    monkeypatch.setenv(CHECKPOINT_DIR.name, str(checkpoints))  # what fedtune-server sets on its SuperLink
    args = ["--clients", "3", "--rounds", "2", "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv),
            "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32", "--no-dp",
            "--set", "learning-rate=0.5", "--out", str(out),
            "--insecure-reproducible-seed", "7"]  # the same sampling on both runs (simulation only)
    assert main(args) == 0
    uninterrupted = load_file(out / "adapter" / "adapter_model.safetensors")
    first_lines = (out / "metrics.jsonl").read_text().splitlines()

    (checkpoints / LATEST).write_text("round-0001\n")  # as if the server died right after round 1
    assert main(args) == 2  # an existing result is never overwritten by accident
    assert main([*args, "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed-after-round"] == 1 and summary["status"] == "completed"
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_allclose(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6, err_msg=name)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first_lines[:2]  # rounds 0-1 come from the checkpoint, not re-run
    assert json.loads(lines[2])["accuracy"] == json.loads(first_lines[2])["accuracy"]
