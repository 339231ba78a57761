from __future__ import annotations

from fedtune.sim.bench import main


def test_bench_writes_a_side_by_side_table(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.md"
    assert main(["--model", str(tiny_model_dir), "--batch", "8", "--seq", "8", "--steps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "DP / non-DP" in text and out.with_suffix(".json").exists()
