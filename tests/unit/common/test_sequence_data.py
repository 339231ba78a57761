"""Bad ner/sft input is reported before training, naming the file and line of every problem."""

from __future__ import annotations

import json

import pytest

from fedtune.common.data.sequence import read_sft_jsonl, read_token_file, tag_names
from fedtune.common.data.table import federation_split
from fedtune.common.errors import DataError
from fedtune.common.tasks import get_task
from tests.tiny_tasks import make_tiny_decoder, write_sft_jsonl


def test_sft_jsonl_names_every_line_without_a_response(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "how are you"}\n\n'
                    '{"prompt": "x", "answer": "y"}\nnot json\n[1]\n')
    with pytest.raises(DataError) as err:
        read_sft_jsonl(path)
    text = str(err.value)
    assert f"{path} line 2: no 'response' field" in text
    assert f"{path} line 4: no 'response' field" in text and "fields are: prompt, answer" in text
    assert f"{path} line 5: not valid JSON" in text and f"{path} line 6: expected a JSON object" in text
    assert "line 1" not in text


def test_conll_wrong_column_count_and_unknown_tag_name_file_and_line(tmp_path):
    path = tmp_path / "ner.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nlives VBZ B-VP O\n\n"
                    "in IN O\nParis NNP B-NP B-LOC\n\nBob NNP B-NP B-FOO\n")
    with pytest.raises(DataError) as err:
        read_token_file(path, [])
    assert str(err.value).count(str(path)) == 1
    assert f"{path} line 6: 3 columns, expected 4 (as on line 3)" in str(err.value)
    path.write_text("John NNP B-NP B-PER\n\nParis NNP B-NP B-LOC\n\nBob NNP B-NP B-FOO\n")
    with pytest.raises(DataError) as err:
        read_token_file(path, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert f"{path} line 5: unknown tag 'B-FOO'" in str(err.value) and err.value.code == "DATA_LABELS"
    path.write_text("John NNP B-NP PERSON\n")
    with pytest.raises(DataError, match=r"line 1: tag 'PERSON' is not a BIO tag"):
        read_token_file(path, [])


def test_token_jsonl_and_tag_order(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"tokens": ["Ann", "in", "Rome"], "tags": ["B-PER", "O", "B-LOC"]}) + "\n"
                    + json.dumps({"tokens": ["x"], "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"line 2: 1 tokens but 2 tags"):
        read_token_file(path, [])
    path.write_text(json.dumps({"tokens": ["Ann", "in", "Rome"], "tags": ["B-PER", "O", "B-LOC"]}) + "\n")
    data = read_token_file(path, [])
    assert data.label_names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"] == tag_names(["B-PER", "B-LOC", "O"])
    assert data.dataset["tags"][0] == [3, 0, 1]


def test_sequence_longer_than_the_models_context_names_the_line(tmp_path):
    decoder = make_tiny_decoder(tmp_path / "dec", context=32)
    task = get_task("sft")
    rows = [{"prompt": "hi", "response": "fine"}, {"prompt": "good " * 40, "response": "fine"}]
    data = read_sft_jsonl(write_sft_jsonl(tmp_path / "long.jsonl", rows))
    with pytest.raises(DataError, match=rf"{tmp_path / 'long.jsonl'} line 2: \d+ tokens, longer than the model's "
                                        r"context of 32"):
        task.encode(task.load_base(str(decoder)), data, 16)


def test_split_without_class_labels(tmp_path):
    data = read_sft_jsonl(write_sft_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"}
                                                                 for i in range(40)]))
    train, test = federation_split(data, 0.25, seed=3, max_train=20)
    assert len(test.dataset) == 10 and len(train.dataset) == 20
    assert not set(train.dataset["prompt"]) & set(test.dataset["prompt"])
