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
    # (ratios are rounded to 2 decimals: a small one, on a loaded machine, is off by up to 0.005 from its rates)
    assert t["default-over-naive"] == pytest.approx(t["default-ex-per-s"] / t["naive-ex-per-s"], rel=0.02, abs=0.006)
    assert t["cached-over-naive"] == pytest.approx(t["top-layers-cached-ex-per-s"] / t["naive-ex-per-s"], rel=0.02,
                                                   abs=0.006)
    assert t["dynamic-padding-over-naive"] == pytest.approx(t["dynamic-padding-ex-per-s"] / t["naive-ex-per-s"],
                                                            rel=0.02, abs=0.006)
    assert t["top-layers-amortised-ex-per-s"] < t["top-layers-cached-ex-per-s"]  # the cache's cost is counted
    o = result["overhead"]
    assert bench.TRAIN_PART in o["parts-s"] and bench.LEDGER_PART in o["parts-s"]
    assert o["examples-per-node"] == 40 and o["steps"] == 3  # one epoch of the node's examples
    assert "lower-layer cache (once per node and job, shown per round)" in o["parts-s"]  # --round-layers 1
    assert 0 < o["overhead-share"] < 1 and o["reply-bytes"] > 0
    # A run's first charge plans the noise; the later rounds reuse the plan, so the mean is below it x nodes.
    assert 0 < o["parts-s"][bench.LEDGER_PART] < o["first-charge-s"] * o["nodes"]
    assert 0 < o["node-first-round-share"] < 1
    h = o["fp16-transport"]  # fp16 halves the tensors; rounding the update itself loses less than the values
    assert h["fp16-bytes"] * 2 == h["fp32-bytes"]
    assert 0 < h["update-error-over-update"] <= h["values-error-over-update"]
    f = result["fixed-shape"]  # the default loop with and without the node policy's fixed-shape, pair by pair
    assert f["default-ex-per-s"] > 0 and f["fixed-shape-ex-per-s"] > 0 and f["cached-fixed-shape-ex-per-s"] > 0
    assert len(f["fixed-over-default-runs"]) == f["repeats"] == len(f["default-runs"])
    assert min(f["fixed-over-default-runs"]) <= f["fixed-over-default"] <= max(f["fixed-over-default-runs"])
    text = out.read_text()
    assert f"**{t['cached-over-naive']}**" in text and f"{100 * o['overhead-share']:.1f}%" in text
    assert f"**{f['fixed-over-default']:.2f}**" in text and f"**{f['cached-fixed-over-default']:.2f}**" in text


@pytest.mark.parametrize(("parts", "one_forward_per_step", "width"), [
    (bench.NAIVE_PARTS, True, 16),  # the naive loop: each batch whole, at max-seq-len
    (bench.WHOLE_BATCH_PARTS, True, 7),  # each batch whole, padded to its longest example (7 tokens here)
    (None, False, 7),  # the node's own loop (train): parts of PART_SIZE, each padded to its longest example
])
def test_the_benchmarks_loops_cut_each_poisson_batch_as_they_say(tiny_model_dir, monkeypatch, parts,
                                                                 one_forward_per_step, width):
    import torch

    from fedtune.client import trainer
    from fedtune.client.randomness import RoundSeeds
    from fedtune.common.models.base import encode, load_base
    from tests.tiny import make_sentiment_frame

    shapes: list[tuple[int, ...]] = []
    step_loss = trainer.step_loss
    monkeypatch.setattr(trainer, "step_loss", lambda task, module, part, device, **kw: shapes.append(
        tuple(part["input_ids"].shape)) or step_loss(task, module, part, device, **kw))
    monkeypatch.setattr(trainer, "PART_SIZE", 4)
    base = load_base(str(tiny_model_dir))
    frame = make_sentiment_frame(48, seed=1)
    ids, mask = encode(base.tokenizer, frame["text"].tolist(), 16)
    data = (ids, mask, torch.tensor((frame["label"] == "pos").astype(int).to_numpy()))
    model = bench.build_model(base, 2, bench.NAIVE_LORA, torch.device("cpu"))
    result = bench.bench_train(model, data, steps=3, batch=16, device=torch.device("cpu"),
                               seeds=RoundSeeds.insecure(0, 1, "t"), parts=parts)
    assert result.steps == 3 and sum(n for n, _ in shapes) == result.examples > 0
    assert {w for _, w in shapes} == {width}
    assert (len(shapes) == 3) if one_forward_per_step else max(n for n, _ in shapes) <= 4


def test_scale_rows_are_parsed_and_merged_over_the_previous_table(monkeypatch, tmp_path):
    from fedtune.common.errors import ConfigError
    from fedtune.sim import scale

    specs = scale.scale_specs("100:minilm:2, 1000:tiny")
    assert [(s.clients, s.model, s.rounds) for s in specs] == [(100, "minilm", 2), (1000, "tiny", 2)]
    with pytest.raises(ConfigError, match="'10:gpt'"):
        scale.scale_specs("10:gpt")
    row = {"clients": 1000, "model": "tiny BERT (2x32)", "s-per-round": 1.0}
    monkeypatch.setattr(scale, "scale_rows", lambda out, specs: {"rows": [row], "failed": [], "plot": None})
    monkeypatch.setattr(scale, "plot", lambda rows, path: path.write_bytes(b"png"))
    old = {"rows": [{**row, "s-per-round": 9.0}, {"clients": 100, "model": "all-MiniLM-L6-v2", "s-per-round": 5.0}]}
    merged = scale.merge_scale_rows(old, specs[1:], tmp_path)
    assert sorted((r["clients"], r["s-per-round"]) for r in merged["rows"]) == [(100, 5.0), (1000, 1.0)]
    assert (tmp_path / scale.PLOT).read_bytes() == b"png"


def test_fixed_shape_only_replaces_that_section_and_keeps_every_other_row(monkeypatch, tmp_path):
    from fedtune.sim import shape_cost

    out = tmp_path / "bench.md"
    previous = {"machine": {"load-1min": 1.0}, "throughput": {"default-ex-per-s": 136.9}, "overhead": {"nodes": 5},
                "fixed-shape": {"fixed-over-default": 0.1}, "scale": {"rows": [{"clients": 100}]},
                "main-job": [{"results": "run1"}]}
    out.with_suffix(".json").write_text(json.dumps(previous))
    asked = {}

    def measured(model_path, **kwargs):
        asked.update(kwargs)
        return {"fixed-over-default": 0.6}

    monkeypatch.setattr(shape_cost, "fixed_shape_cost", measured)
    assert main(["--fixed-shape-only", "--examples", "64", "--steps", "2", "--out", str(out)],
                render=lambda r: json.dumps(r)) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result == {**previous, "fixed-shape": {"fixed-over-default": 0.6}}
    assert json.loads(out.read_text()) == result
    assert asked["examples"] == 64 and asked["steps"] == 2 and asked["top"].lora_layers == "4,5"
