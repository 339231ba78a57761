from __future__ import annotations

import json

import pytest

from fedtune.sim import bench
from fedtune.sim.bench import main


def test_bench_writes_the_side_by_side_loops_and_the_round_breakdown(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.md"
    assert main(["--model", str(tiny_model_dir), "--examples", "48", "--batch", "16", "--steps", "2",
                 "--top-layers", "1", "--eval-examples", "64", "--node-examples", "40", "--round-layers", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    t = result["throughput"]
    # Every loop was measured, and every ratio follows from the measured rates.
    assert t["naive-ex-per-s"] > 0 and t["dynamic-padding-ex-per-s"] > 0 and t["top-layers-cached-ex-per-s"] > 0
    assert t["sorted-parts-ex-per-s"] > 0 and t["default-ex-per-s"] > 0
    assert t["default-over-naive"] == pytest.approx(t["default-ex-per-s"] / t["naive-ex-per-s"], rel=0.02)
    assert t["cached-over-naive"] == pytest.approx(t["top-layers-cached-ex-per-s"] / t["naive-ex-per-s"], rel=0.02)
    assert t["dynamic-padding-over-naive"] == pytest.approx(t["dynamic-padding-ex-per-s"] / t["naive-ex-per-s"],
                                                            rel=0.02)
    assert t["top-layers-amortised-ex-per-s"] < t["top-layers-cached-ex-per-s"]  # the cache's cost is counted
    o = result["overhead"]
    assert bench.TRAIN_PART in o["parts-s"] and bench.LEDGER_PART in o["parts-s"]
    assert o["examples-per-node"] == 40 and o["steps"] == 3  # one epoch of the node's examples
    assert "lower-layer cache (once per node and job, shown per round)" in o["parts-s"]  # --round-layers 1
    assert 0 < o["overhead-share"] < 1 and o["reply-bytes"] > 0
    # A run's first charge plans the noise; the later rounds reuse the plan, so the mean is below it x nodes.
    assert 0 < o["parts-s"][bench.LEDGER_PART] < o["first-charge-s"] * o["nodes"]
    assert 0 < o["node-first-round-share"] < 1
    text = out.read_text()
    assert f"**{t['cached-over-naive']}**" in text and f"{100 * o['overhead-share']:.1f}%" in text
