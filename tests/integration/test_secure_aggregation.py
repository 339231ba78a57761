"""Secure aggregation end to end: Flower's SecAgg+ in the real simulation engine, on a tiny model."""

from __future__ import annotations

import json

from fedtune.common.ledger.receipts import read_run_record
from fedtune.sim.cli import main


def _args(tiny_model_dir, sentiment_csv, out, *extra):
    return ["--clients", "3", "--rounds", "2", "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv),
            "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32",
            "--set", "secure-aggregation=true", "--out", str(out), *extra]


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_secure_rounds_learn_and_keep_receipts(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "secure"
    code = main(_args(tiny_model_dir, sentiment_csv, out, "--no-dp", "--set", "learning-rate=0.5",
                      "--local-epochs", "3"))
    assert code == 0
    rounds = _rounds(out)
    assert max(r["accuracy"] for r in rounds[1:]) > rounds[0]["accuracy"] + 0.1
    for line in rounds[1:]:
        secure = line["secure-aggregation"]
        assert secure["aggregated"] and secure["in-sum"] == secure["trained"] == 3 and secure["clamped"] == 0
        assert all(c["status"] == "trained" for c in line["clients"])
    record = read_run_record(out, None).record
    assert record is not None and len(record.receipts) == 6 and record.client_level is None
