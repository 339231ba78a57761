"""fedtune-predict: CSV/JSONL in, predictions + probabilities out; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from fedtune.common.models.adapter import AdapterMeta, save_adapter, to_arrays
from fedtune.common.models.base import base_model_ref, load_base
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.classify.adapter import load_adapter
from fedtune.common.tasks.classify.model import build_model
from fedtune.tools.predict import main

TEXTS = ["the movie was good", "awful boring film", "a lovely story"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    base = load_base(str(tiny_model_dir))
    model = build_model(base, 2, LoraSettings(lora_rank=4), torch.device("cpu"), seed=0)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.normal_(0, 1.0)
    out = tmp_path_factory.mktemp("run") / "adapter"
    meta = AdapterMeta(base_model_ref(str(base.path)), ["neg", "pos"], 16)
    return save_adapter(model, to_arrays(model), out, meta=meta)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predictions_and_probabilities_for_csv_and_jsonl(adapter, tiny_model_dir, tmp_path, suffix):
    frame = pd.DataFrame({"id": [1, 2, 3], "review": TEXTS})
    src = tmp_path / f"in{suffix}"
    frame.to_csv(src, index=False) if suffix == ".csv" else frame.to_json(src, orient="records", lines=True)
    out = tmp_path / f"out{suffix}"
    assert main([str(adapter), str(src), "--text-column", "review", "--base", str(tiny_model_dir),
                 "-o", str(out)]) == 0
    got = pd.read_csv(out) if suffix == ".csv" else pd.read_json(out, lines=True)
    expected = load_adapter(adapter, base=tiny_model_dir).predict_proba(TEXTS)
    assert list(got["id"]) == [1, 2, 3] and list(got["review"]) == TEXTS
    assert got[["prob:neg", "prob:pos"]].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert list(got["prediction"]) == [["neg", "pos"][i] for i in expected.argmax(axis=1)]


@pytest.mark.parametrize(("content", "extra", "message"), [
    (None, [], "does not exist"),
    ("id,text\n1,fine\n2,\n", [], "row 3 has an empty or non-text 'text'"),
    ("id,body\n1,fine\n", [], "column 'text' (--text-column) is missing"),
    ("id,text\n1,fine\n", ["-o", "out.parquet"], "--output must end in .csv or .jsonl"),
    ("id,text\n1,fine\n", ["--base", "/nonexistent/model"], "not a Hugging Face model directory"),
])
def test_bad_input_is_one_line_and_exit_2(adapter, tmp_path, capsys, content, extra, message):
    src = tmp_path / "in.csv"
    if content is not None:
        src.write_text(content)
    assert main([str(adapter), str(src), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_console_script_runs(adapter, tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    proc = subprocess.run([sys.executable, "-m", "fedtune.tools.predict", str(adapter), str(src), "--base",
                           str(tiny_model_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "text,prediction,prob:neg,prob:pos" and len(proc.stdout.splitlines()) == 4


def test_export_is_a_stock_sentence_transformers_model_with_the_same_predictions(adapter, tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "exported"
    assert main([str(adapter), "--base", str(tiny_model_dir), "--export-sentence-transformers", str(out)]) == 0
    logits = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True)
    expected = load_adapter(adapter, base=tiny_model_dir).predict_proba(TEXTS)
    assert torch.softmax(logits, dim=-1).numpy() == pytest.approx(expected, abs=1e-5)
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    assert str(tmp_path) not in "".join(p.read_text(errors="ignore") for p in out.rglob("*.json"))
