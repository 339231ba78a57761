"""The adapter's model card: Hub metadata, no template placeholder, a complete privacy statement."""

from __future__ import annotations

import math

import pytest

from fedtune.common.models.adapter import AdapterMeta
from fedtune.common.models.base import base_model_ref
from fedtune.common.models.card import CardInfo, NodeStatement, card_metadata, write_model_card
from fedtune.common.settings import RunSettings
from fedtune.common.tasks.classify.evaluation import LabelMetrics


def _info(dp: bool = True) -> CardInfo:
    settings = RunSettings.from_config({"dp": dp, "data-description": "Synthetic movie snippets made by a test.",
                                        "dataset": "/somewhere/private/notes.csv", "num-rounds": 3})
    nodes = [NodeStatement("client-0", 7.9832 if dp else None, 1e-5, 8.0, "prv", 1.0, 0.7636 if dp else None,
                           0.125, 24, 3, 1000),
             NodeStatement("client-1", 6.5 if dp else None, 1e-5, 8.0, "rdp", 1.0, 0.9, 0.25, 12, 3, 400)]
    return CardInfo(meta=AdapterMeta(base_model_ref(""), ["rotten", "fresh"], 48), settings=settings, nodes=nodes,
                    rounds=3, num_clients=2, held_out_examples=1922, accuracy=0.7508, loss=0.847,
                    per_label=[("rotten", LabelMetrics(0.71, 0.62, 0.66, 800)),
                               ("fresh", LabelMetrics(0.77, 0.84, 0.80, 1122))])


def test_card_has_hub_metadata_and_no_placeholder(tmp_path):
    path = write_model_card(tmp_path, _info())
    text = path.read_text()
    meta = card_metadata(path)
    assert meta["library_name"] == "peft" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["base_model_revision"] == "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    assert {"fedtune", "federated-learning", "differential-privacy"} <= set(meta["tags"])
    assert "accuracy" in meta["metrics"] and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.7508
    assert "More Information Needed" not in text and "{{" not in text and "TODO" not in text
    assert "/somewhere" not in text and "notes.csv" in text
    assert "Synthetic movie snippets made by a test." in text
    for needle in ("Unit of privacy", "one example", "Trust model", "Not protected", "NIST SP 800-226",
                   "| rotten | 0.7100 | 0.6200 |", "1922 examples", "FedAvg"):
        assert needle in text, needle


def test_privacy_statement_lists_each_nodes_epsilon_delta_and_mechanism(tmp_path):
    text = write_model_card(tmp_path, _info()).read_text()
    assert "| client-0 | 7.9832 | 1e-05 | 8.0000 | prv | 1 | 0.7636 | 0.1250 | 24 | 3 |" in text
    assert "| client-1 | 6.5000 | 1e-05 | 8.0000 | rdp |" in text
    nodes = card_metadata(tmp_path / "README.md")["privacy"]["nodes"]
    assert [(n["node"], n["epsilon"], n["delta"]) for n in nodes] == [("client-0", 7.9832, 1e-5),
                                                                     ("client-1", 6.5, 1e-5)]


def test_a_non_private_run_says_so(tmp_path):
    path = write_model_card(tmp_path, _info(dp=False))
    text = path.read_text()
    assert "trained without differential privacy" in text and "| client-0 | ∞ (no DP) |" in text
    assert "differential-privacy" not in card_metadata(path)["tags"]


@pytest.mark.parametrize("value", [float("nan"), None])
def test_missing_numbers_render_as_not_available(tmp_path, value):
    info = _info()
    info = CardInfo(**{**info.__dict__, "accuracy": value, "loss": value, "per_label": [
        ("rotten", LabelMetrics(math.nan, 0.0, math.nan, 0))]})
    text = write_model_card(tmp_path, info).read_text()
    assert "accuracy **n/a**" in text and "| rotten | n/a | 0.0000 | n/a | 0 |" in text


@pytest.mark.parametrize(("task", "labels", "extra", "kind", "metric", "loader"), [
    ("ner", ["O", "B-PER", "I-PER"], {"entity-f1": 0.4586, "entity-precision": 0.44, "entity-recall": 0.47},
     "token-classification", ("f1", 0.4586), "AutoModelForTokenClassification"),
    ("sft", [], {"perplexity": 21.5}, "text-generation", ("perplexity", 21.5), "AutoModelForCausalLM"),
])
def test_ner_and_sft_cards_name_their_task_metric_and_stock_loader(tmp_path, task, labels, extra, kind, metric,
                                                                   loader):
    info = _info()
    settings = RunSettings.from_config({"task": task, "num-rounds": 3})
    info = CardInfo(**{**info.__dict__, "settings": settings, "per_label": [], "extra": extra,
                       "meta": AdapterMeta(base_model_ref(""), labels, 64, task)})
    path = write_model_card(tmp_path, info)
    meta, text = card_metadata(path), path.read_text()
    assert meta["pipeline_tag"] == kind and kind in meta["tags"]
    first = meta["model-index"][0]["results"][0]
    assert first["task"]["type"] == kind and (first["metrics"][0]["type"], first["metrics"][0]["value"]) == metric
    assert loader in text and "PeftModel.from_pretrained" in text and "fedtune.common.models.adapter" not in text
    assert "Unit of privacy" in text and "7.9832" in text


def test_the_classifiers_card_loads_the_adapter_with_a_module_that_exists(tmp_path):
    import importlib
    import re

    text = write_model_card(tmp_path, _info()).read_text()
    module, name = re.search(r"from (\S+) import (\w+)", text).groups()
    assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
