"""Secure aggregation end to end: Flower's SecAgg+ in the real simulation engine, on a tiny model."""

from __future__ import annotations

import json

import pytest

from fedtune.audit.cli import main as audit_main
from fedtune.common.ledger.key import load_public_key
from fedtune.common.ledger.receipts import read_run_record
from fedtune.common.privacy.distributed import gaussian_epsilon
from fedtune.sim.cli import main


def _args(tiny_model_dir, sentiment_csv, out, *extra):
    return ["--clients", "3", "--rounds", "2", "--model", str(tiny_model_dir), "--dataset", str(sentiment_csv),
            "--set", "partition-by=group", "--set", "max-seq-len=16", "--set", "batch-size=32",
            "--set", "secure-aggregation=true", "--out", str(out), *extra]


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the default suite runs a whole SecAgg+ round in process (tests/unit/server/test_secure_protocol.py)
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
    record = read_run_record(out, load_public_key(out / "server-record.pub")).record
    assert record is not None and len(record.receipts) == 6 and record.client_level is None
    assert "Secure aggregation (SecAgg+)" in (out / "report.html").read_text()


@pytest.mark.slow
def test_client_dp_five_nodes_three_rounds_is_recorded_reported_and_audited(tiny_model_dir, sentiment_csv, tmp_path):
    """5 nodes x 3 rounds with DP-SGD and client-dp: the client-level epsilon is in the signed run record, the
    round lines and the report, and an independent accountant (dp-accounting) recomputes it within 1%."""
    out = tmp_path / "client-dp"
    code = main([*_args(tiny_model_dir, sentiment_csv, out, "--client-dp", "--epsilon", "8"),
                 "--clients", "5", "--rounds", "3", "--set", "client-noise-multiplier=0.8"])
    assert code == 0
    rounds = _rounds(out)
    assert all(r["secure-aggregation"]["aggregated"] and r["secure-aggregation"]["trained"] == 5 for r in rounds[1:])
    level = read_run_record(out, load_public_key(out / "server-record.pub")).record.client_level
    assert level is not None and level["rounds"] == 3 and level["noise-multiplier"] == 0.8
    assert "honest" in level["trust"] and "Skellam" in level["mechanism"]
    assert level["epsilon"] == pytest.approx(gaussian_epsilon(0.8, 3, level["delta"]), rel=0.01)
    assert rounds[-1]["client-epsilon"] == pytest.approx(level["epsilon"])
    assert "Client-level DP of the aggregate" in (out / "report.html").read_text()
    report = audit_main(["--roster", str(out / "clients" / "roster.toml"), "--server-record", str(out),
                         "--server-key", str(out / "server-record.pub"), "--json"])
    assert report == 0
