"""Loading and validating labelled text data (CSV, JSONL, Parquet, or a built-in corpus).

Every problem found in a file is reported at once, naming the file, column and
row, so an operator can fix the data in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from fedtune.common.corpus import BUILTIN
from fedtune.common.errors import DataError
from fedtune.common.settings import DataSettings

_READERS = {
    ".csv": lambda p: pd.read_csv(p, encoding="utf-8", dtype=str, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", encoding="utf-8", dtype=str, keep_default_na=False),
    ".jsonl": lambda p: pd.read_json(p, lines=True, encoding="utf-8", dtype=False),
    ".json": lambda p: pd.read_json(p, lines=True, encoding="utf-8", dtype=False),
    ".parquet": pd.read_parquet,
}


@dataclass(frozen=True)
class LabelledData:
    """Validated examples: a ``datasets.Dataset`` with ``text`` (str), ``label`` (int)
    and any extra columns (e.g. the natural-split key), plus the label names in class order."""

    dataset: datasets.Dataset
    label_names: list[str]
    origin: str = ""  # the file or corpus the examples came from (error messages name it with a line)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _first_bad_utf8_line(path: Path) -> int | None:
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return lineno
    return None


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file, turning every failure into a DataError."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass an existing CSV, JSONL or Parquet file",
                        code="DATA_MISSING")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file", code="DATA_MISSING")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"data file {path} has suffix '{path.suffix}'; use one of {', '.join(_READERS)}")
    if path.suffix.lower() != ".parquet" and (line := _first_bad_utf8_line(path)) is not None:
        raise DataError(f"data file {path} line {line} is not valid UTF-8 text; re-save the file as UTF-8")
    try:
        return reader(path)
    except (ValueError, pd.errors.ParserError, OSError) as err:
        if isinstance(err, pd.errors.EmptyDataError):
            raise DataError(f"data file {path} is empty; it needs a header and at least one example") from err
        raise DataError(f"data file {path} could not be parsed as {path.suffix[1:]}: {err}") from err


def load_labelled(settings: DataSettings, path_override: str | None = None) -> LabelledData:
    """Load the configured dataset (built-in corpus or file) and validate it."""
    source = path_override or settings.dataset
    if source in BUILTIN:
        corpus = BUILTIN[source]()
        return validate(corpus.frame, "text", "label", corpus.labels, origin=source)
    return validate(
        read_table(Path(source)), settings.text_column, settings.label_column,
        settings.label_list, origin=str(source),
    )


def _quote(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(
    frame: pd.DataFrame, text_column: str, label_column: str, labels: list[str], *, origin: str,
    skipped: list[str] | None = None,
) -> LabelledData:
    """Check columns, emptiness, text values and labels; map labels to class indices.

    The DataError's ``code`` says which check failed first (a node sends only that code to the server).
    With ``skipped`` (a node's round: its labels are its own declaration), rows with empty text or a label
    outside ``labels`` are dropped and described in ``skipped`` instead of failing: a node's reply must not
    depend on one row.
    """
    problems = [
        f"{origin}: column {_quote(col)} ({what}) is missing; columns are: "
        f"{', '.join(_quote(c, 40) for c in list(frame.columns)[:20])}"
        for col, what in ((text_column, "text-column"), (label_column, "label-column"))
        if col not in frame.columns
    ]
    if problems:
        raise DataError(problems, code="DATA_SCHEMA")
    if len(frame) == 0:
        raise DataError(f"{origin}: no examples (the file has a header but no rows)", code="DATA_EMPTY")
    raw_labels = frame[label_column].map(lambda v: str(v).strip())
    names = labels or sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    bad_text = [i for i, t in enumerate(frame[text_column]) if not isinstance(t, str) or not t.strip()]
    unknown = [(i, v) for i, v in enumerate(raw_labels) if v not in index]
    problems = _row_problems(origin, text_column, names, bad_text, unknown)
    if skipped is not None and labels and problems:
        skipped += problems
        keep = sorted(set(range(len(frame))) - set(bad_text) - {i for i, _ in unknown})
        if not keep:
            raise DataError(f"{origin}: no row has both text and a declared label", code="DATA_EMPTY")
        frame, raw_labels, problems = frame.iloc[keep], raw_labels.iloc[keep], []
    elif len(names) < 2 and not problems:
        problems.append(f"{origin}: column '{label_column}' has only one label ({_quote(names)}); need at least 2")
    elif not labels and len(names) > max(2, len(frame) // 2) and not problems:
        problems.append(f"{origin}: column '{label_column}' has {len(names)} distinct values in {len(frame)} rows; "
                        "it does not look like a label column (set labels to the class names to accept it)")
    if problems:
        raise DataError(problems, code="DATA_SCHEMA" if bad_text else "DATA_LABELS")
    out = frame.rename(columns={text_column: "text"}).drop(columns=[label_column])
    out["label"] = np.array([index[v] for v in raw_labels], dtype=np.int64)
    out = out.reset_index(drop=True)
    return LabelledData(dataset=datasets.Dataset.from_pandas(out, preserve_index=False), label_names=names)


def _row_problems(origin: str, text_column: str, names: list[str], bad_text: list[int],
                  unknown: list[tuple[int, str]]) -> list[str]:
    """One line per bad row (the first five of each kind, then a count); rows are numbered as in a CSV file."""
    out = [f"{origin}: row {i + 2} has an empty or non-text '{text_column}'" for i in bad_text[:5]]
    if len(bad_text) > 5:
        out.append(f"{origin}: {len(bad_text) - 5} more rows with empty text")
    out += [f"{origin}: row {i + 2} has label {_quote(v)}, not one of {_quote(names, 120)}; fix the row or the labels"
            for i, v in unknown[:5]]
    if len(unknown) > 5:
        out.append(f"{origin}: {len(unknown) - 5} more rows with unknown labels")
    return out


def holdout_split(data: LabelledData, test_fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """Split off a held-out test set (stratified by label when possible), reproducibly."""
    if "label" in data.dataset.column_names:  # one class label per example: stratify
        ds = data.dataset.cast_column("label", datasets.ClassLabel(names=data.label_names))
        try:
            parts = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
        except ValueError:
            parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    else:  # token tags or prompt-response pairs
        parts = data.dataset.train_test_split(test_size=test_fraction, seed=seed)
    return (LabelledData(parts["train"], data.label_names, data.origin),
            LabelledData(parts["test"], data.label_names, data.origin))


def cap(data: LabelledData, max_examples: int, seed: int) -> LabelledData:
    """Keep at most ``max_examples`` (0 = all), chosen reproducibly at random."""
    if max_examples <= 0 or len(data.dataset) <= max_examples:
        return data
    return LabelledData(data.dataset.shuffle(seed=seed).select(range(max_examples)), data.label_names, data.origin)


def federation_split(data: LabelledData, test_fraction: float, seed: int,
                     max_train: int = 0) -> tuple[LabelledData, LabelledData]:
    """(training pool, server's held-out test set): the one split every part of fedtune uses.

    The server evaluates on the test part; in simulation the training pool (capped at ``max_train``
    examples, 0 = all) is what fedtune-sim partitions between the simulated nodes, so no held-out row
    is ever in a node's training data.
    """
    train, test = holdout_split(data, test_fraction, seed)
    return cap(train, max_train, seed), test
