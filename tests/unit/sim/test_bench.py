from __future__ import annotations

import json

import pytest

from fedtune.sim.bench import main


def test_bench_writes_a_side_by_side_table(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.md"
    assert main(["--model", str(tiny_model_dir), "--batch", "8", "--seq", "8", "--steps", "2", "--out", str(out)]) == 0
    row = json.loads(out.with_suffix(".json").read_text())
    # Both timings were measured, and every derived figure follows from them.
    assert row["dp-s-per-step"] > 0 and row["non-dp-s-per-step"] > 0
    assert row["dp-over-non-dp"] == pytest.approx(row["dp-s-per-step"] / row["non-dp-s-per-step"], rel=0.02)
    assert row["dp-examples-per-s"] == pytest.approx(8 / row["dp-s-per-step"], rel=0.02)
    assert f"**{row['dp-over-non-dp']}**" in out.read_text()
