"""Data files: valid input loads; each kind of bad input gets one clear DataError."""

from __future__ import annotations

import pandas as pd
import pytest

from fedtune.common.data.table import cap, federation_split, holdout_split
from fedtune.common.errors import DataError
from fedtune.common.settings import DataSettings
from fedtune.common.tasks.classify.data import load_labelled


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


def _rows(data) -> list[tuple[str, int]]:
    return list(zip(data.dataset["text"], data.dataset["label"], data.dataset["group"], strict=True))


def test_holdout_is_reproducible_and_disjoint(tmp_path):
    frame = pd.DataFrame({"text": [f"example number {i}" for i in range(600)],  # every row distinct
                          "label": ["pos" if i % 3 else "neg" for i in range(600)], "group": ["g"] * 600})
    frame.to_csv(tmp_path / "d.csv", index=False)
    data = load_labelled(_settings(tmp_path / "d.csv"))
    train, test = holdout_split(data, 0.2, seed=7)
    train2, test2 = holdout_split(data, 0.2, seed=7)
    assert _rows(train) == _rows(train2) and _rows(test) == _rows(test2)
    assert len(test.dataset) == 120 and len(train.dataset) == 480
    assert not set(_rows(train)) & set(_rows(test))
    assert set(_rows(train)) | set(_rows(test)) == set(_rows(data))
    assert _rows(holdout_split(data, 0.2, seed=8)[1]) != _rows(test)
    capped = cap(train, 100, 1)
    assert len(capped.dataset) == 100 and set(_rows(capped)) <= set(_rows(train))


def test_federation_split_keeps_the_held_out_set_out_of_the_capped_pool(tmp_path):
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(400)], "label": ["a", "b"] * 200, "group": ["g"] * 400})
    frame.to_csv(tmp_path / "d.csv", index=False)
    data = load_labelled(_settings(tmp_path / "d.csv"))
    pool, test = federation_split(data, 0.25, seed=3, max_train=120)
    assert len(test.dataset) == 100 and len(pool.dataset) == 120
    assert not set(_rows(pool)) & set(_rows(test))
    assert _rows(federation_split(data, 0.25, seed=3, max_train=120)[1]) == _rows(test)


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
    (lambda p: p.write_text("text,label\n" + "".join(f"t{i},l{i}\n" for i in range(20))), {},
     "does not look like a label column"),
])
def test_bad_data_gets_a_clear_error(tmp_path, write, kw, message):
    path = tmp_path / "data.csv"
    if write:
        write(path)
    with pytest.raises(DataError) as err:
        load_labelled(_settings(path, **kw))
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert err.value.code.startswith("DATA_")  # what a node would send the server instead of this text


def test_unknown_suffix(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="use one of"):
        load_labelled(_settings(tmp_path / "d.xlsx"))


def test_in_memory_is_from_pandas_without_hashing_the_table(monkeypatch) -> None:
    """Same rows and features as ``datasets.Dataset.from_pandas``; ``datasets``' dill hash of the table is never
    computed (it cost a node more than reading its file), and each dataset gets its own fingerprint."""
    import datasets

    from fedtune.common.data import table

    frame = pd.DataFrame({"text": ["a b", "c"], "label": [1, 0]})
    monkeypatch.setattr(datasets.fingerprint.Hasher, "hash", lambda *_: pytest.fail("the table was hashed"))
    ours, again = table.in_memory(frame), table.in_memory(frame)
    monkeypatch.undo()
    theirs = datasets.Dataset.from_pandas(frame, preserve_index=False)
    assert ours.features == theirs.features and ours.to_list() == theirs.to_list()
    assert ours._fingerprint != again._fingerprint
