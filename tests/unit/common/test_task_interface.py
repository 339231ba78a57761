"""What callers outside ``common/tasks/`` ask a task instead of comparing its name: the trainer's inputs, the
adapter's fedtune.json fields, the model card's parts, summary.json's fields, and fedtune-sim's default job."""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import get_args

import datasets
import pytest
import torch

from fedtune.common.data.table import LabelledData
from fedtune.common.models.adapter import AdapterMeta
from fedtune.common.models.base import base_model_ref, encode, load_base
from fedtune.common.settings import LoraSettings, ModelSettings, TaskName
from fedtune.common.tasks import DEFAULT_TASK, TASKS, get_task
from fedtune.common.tasks.card import TaskCard
from fedtune.common.tasks.classify.baseline import MajorityBaseline, majority_baseline, quality_warnings

HELD_OUT = LabelledData(datasets.Dataset.from_dict({"text": list("abcdefgh"), "label": [1, 1, 0, 1, 2, 1, 1, 0]}),
                        ["ham", "spam", "other"])


@pytest.mark.parametrize("name", TASKS)
def test_every_task_answers_what_callers_ask(name):
    task = get_task(name)
    assert task.name == name and task.clients >= 1
    assert isinstance(task.card, TaskCard) and isinstance(task.adapter_fields, Mapping)
    assert task.card.metrics and callable(task.train_inputs) and callable(task.summary_fields)


def test_the_registry_holds_the_one_default_and_the_settings_agree():
    assert get_args(TaskName) == TASKS
    assert ModelSettings().task == DEFAULT_TASK  # settings.py stays free of torch: its default is a literal
    assert AdapterMeta(base_model_ref(""), ["a", "b"], 8).task == DEFAULT_TASK


def test_fedtune_sim_default_jobs():
    assert {name: get_task(name).clients for name in TASKS} == {"classify": 5, "ner": 3, "sft": 3}


def test_the_classifier_reports_its_majority_class_and_warns_when_no_better():
    assert majority_baseline([1, 1, 0, 1, 2, 1, 1, 0], ["ham", "spam", "other"]) == MajorityBaseline("spam", 5 / 8)
    task = get_task("classify")
    assert task.summary_fields(HELD_OUT, [{"accuracy": 0.5}, {"accuracy": 0.70}]) == {
        "majority-label": "spam", "majority-accuracy": 0.625, "warnings": []}
    fields = task.summary_fields(HELD_OUT, [{"accuracy": 0.588}])
    assert len(fields["warnings"]) == 1 and "majority-class accuracy 0.6250" in fields["warnings"][0]
    assert task.summary_fields(HELD_OUT, [])["warnings"] == []  # no round: nothing to compare
    empty = majority_baseline([], ["ham"])
    assert empty.label == "ham" and math.isnan(empty.accuracy) and quality_warnings(0.1, empty) == []


@pytest.mark.parametrize("name", ["ner", "sft"])
def test_tasks_without_classes_add_no_summary_fields(name):
    assert get_task(name).summary_fields(HELD_OUT, [{"accuracy": 0.1}]) == {}


@pytest.mark.parametrize("name", TASKS)
def test_fedtune_json_describes_the_classifiers_head_by_a_class_that_exists(name):
    out = AdapterMeta(base_model_ref(""), ["a", "b"], 8, name).to_json()
    assert out["fedtune-task"] == name and out["task"] == get_task(name).pipeline_tag
    if name != "classify":
        assert "head" not in out  # a stock transformers class: nothing to describe
        return
    path = out["head"].split("(")[-1].rstrip(")")
    module, cls = path.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), cls), path


def test_the_classifier_trains_from_cached_states_only_when_lora_starts_above_layer_0(tiny_model_dir):
    task = get_task("classify")
    base = load_base(str(tiny_model_dir))
    ids, mask = encode(base.tokenizer, ["a fine film", "dull"], 8)
    encoded = (ids, mask, torch.tensor([1, 0]))
    everywhere = task.train_inputs(base, encoded, LoraSettings(lora_rank=4))
    assert set(everywhere) == {"input_ids", "attention_mask", "labels"} and everywhere["input_ids"] is ids
    top = task.train_inputs(base, encoded, LoraSettings(lora_rank=4, lora_layers="1"))
    assert set(top) == {"hidden_states", "attention_mask", "labels"}
    assert top["hidden_states"].shape == (2, 8, base.hidden_size)
    ner = get_task("ner").train_inputs(base, encoded, LoraSettings(lora_rank=4, lora_layers="1"))
    assert set(ner) == {"input_ids", "attention_mask", "labels"}  # the token head needs every layer
