"""Data files: valid input loads; each kind of bad input gets one clear DataError."""

from __future__ import annotations

import pandas as pd
import pytest

from fedtune.common.data import cap, holdout_split, load_labelled
from fedtune.common.errors import DataError
from fedtune.common.settings import DataSettings


def _settings(path, **kw):
    return DataSettings(dataset=str(path), **kw)


def test_csv_jsonl_parquet_load_the_same(tmp_path, sentiment_csv):
    frame = pd.read_csv(sentiment_csv)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "d.parquet")
    loaded = [load_labelled(_settings(p)) for p in (sentiment_csv, tmp_path / "d.jsonl", tmp_path / "d.parquet")]
    assert all(d.label_names == ["neg", "pos"] for d in loaded)
    assert all(list(d.dataset["label"]) == list(loaded[0].dataset["label"]) for d in loaded)
    assert len(loaded[0].dataset) == 600


def test_holdout_is_reproducible_and_disjoint(sentiment_csv):
    data = load_labelled(_settings(sentiment_csv))
    train, test = holdout_split(data, 0.2, seed=7)
    train2, _ = holdout_split(data, 0.2, seed=7)
    assert list(train.dataset["text"]) == list(train2.dataset["text"])
    assert len(test.dataset) == 120 and len(train.dataset) == 480
    assert len(cap(train, 100, 1).dataset) == 100


@pytest.mark.parametrize(("write", "kw", "message"), [
    (None, {}, "does not exist"),
    (lambda p: p.write_text("text,label\n"), {}, "no examples"),
    (lambda p: p.write_text(""), {}, "is empty"),
    (lambda p: p.write_text("body,label\nhello,pos\nbye,neg\n"), {}, "column 'text' (text-column) is missing"),
    (lambda p: p.write_text("text,label\nhello,pos\nbye,neg\n"), {"label_column": "y"},
     "column 'y' (label-column) is missing"),
    (lambda p: p.write_text("text,label\nhello,pos\nbye,meh\n"), {"labels": "neg,pos"}, "row 3 has label 'meh'"),
    (lambda p: p.write_bytes(b"text,label\nhello,pos\ncaf\xe9,neg\n"), {}, "line 3 is not valid UTF-8"),
    (lambda p: p.write_text("text,label\n,pos\nbye,neg\n"), {}, "row 2 has an empty"),
    (lambda p: p.write_text("text,label\nhello,pos\nbye,pos\n"), {}, "only one label"),
])
def test_bad_data_gets_a_clear_error(tmp_path, write, kw, message):
    path = tmp_path / "data.csv"
    if write:
        write(path)
    with pytest.raises(DataError) as err:
        load_labelled(_settings(path, **kw))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_suffix(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="use one of"):
        load_labelled(_settings(tmp_path / "d.xlsx"))
