"""fedtune-sim --task sft / --task ner: 2 clients x 2 DP rounds through Flower's simulation engine (Ray), on tiny
models built in the test; the exported adapter then loads with stock transformers + PEFT (no fedtune import)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.sim.cli import main
from tests.tiny_tasks import make_tiny_decoder, ner_rows, sft_rows, write_conll, write_sft_jsonl

pytestmark = pytest.mark.slow

STOCK_SFT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
ids = tok("<|im_start|> user good movie <|im_end|> <|im_start|> assistant", return_tensors="pt")["input_ids"]
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                     pad_token_id=tok.pad_token_id)
assert out.shape[1] > ids.shape[1]
print("generated", tok.decode(out[0, ids.shape[1]:]))
"""

STOCK_NER = """
import json, sys, torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
from peft import PeftModel
base, adapter = sys.argv[1], sys.argv[2]
labels = json.load(open(f"{adapter}/fedtune.json"))["labels"]
tok = AutoTokenizer.from_pretrained(base)
stock = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(labels))
model = PeftModel.from_pretrained(stock, adapter).eval()
enc = tok(["the", "movie", "was", "good"], is_split_into_words=True, return_tensors="pt")
with torch.no_grad():
    tags = [labels[i] for i in model(**enc).logits.argmax(-1)[0].tolist()]
head = model.base_model.model.classifier.modules_to_save["default"].weight
assert head.abs().sum() > 0, "the trained head was not loaded"
print("tags", tags)
"""


def _stock(script: str, base: Path, adapter: Path) -> str:
    """Run ``script`` in a fresh interpreter that never imports fedtune; return its output."""
    proc = subprocess.run([sys.executable, "-c", script, str(base), str(adapter)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fedtune" not in proc.stdout
    return proc.stdout


def _rounds(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _dp_within(rounds: list[dict[str, object]], budget: float) -> None:
    eps = [c["epsilon"] for r in rounds[1:] for c in r["clients"]]  # type: ignore[union-attr]
    assert len(eps) == 4 and all(0 < e <= budget for e in eps)


def test_sft_federation_two_clients_two_rounds(tmp_path: Path) -> None:
    decoder = make_tiny_decoder(tmp_path / "tiny-decoder")
    data = write_sft_jsonl(tmp_path / "chat.jsonl", sft_rows(160))
    out = tmp_path / "sft"
    code = main(["--task", "sft", "--clients", "2", "--rounds", "2", "--model", str(decoder), "--dataset", str(data),
                 "--set", "lora-targets=q_proj,v_proj,up_proj", "--set", "max-seq-len=24",
                 "--set", "test-fraction=0.1", "--set", "max-train-examples=0", "--out", str(out)])
    assert code == 0
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(math.isfinite(float(r["perplexity"])) for r in rounds)  # type: ignore[arg-type]
    assert len(rounds[-1]["samples"]) == 3  # type: ignore[arg-type]
    _dp_within(rounds, 8.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["final-perplexity"] == rounds[-1]["perplexity"]
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["task"] == "text-generation" and meta["labels"] == []
    assert "generated" in _stock(STOCK_SFT, decoder, out / "adapter")


def test_ner_federation_two_clients_two_rounds(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_conll(tmp_path / "ner.conll", ner_rows(160))
    out = tmp_path / "ner"
    code = main(["--task", "ner", "--clients", "2", "--rounds", "2", "--model", str(tiny_model_dir),
                 "--dataset", str(data), "--set", "max-seq-len=16", "--out", str(out)])
    assert code == 0
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= float(r["entity-f1"]) <= 1.0 for r in rounds)  # type: ignore[arg-type]
    _dp_within(rounds, 8.0)
    meta = json.loads((out / "adapter" / "fedtune.json").read_text())
    assert meta["task"] == "token-classification" and "B-PER" in meta["labels"]
    assert "tags" in _stock(STOCK_NER, tiny_model_dir, out / "adapter")
