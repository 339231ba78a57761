"""Loading and validating labelled text data (CSV, JSONL, Parquet, or a built-in corpus).

Every problem found in a file is reported at once, naming the file, column and
row, so an operator can fix the data in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd

from fedtune.common.errors import DataError

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


def fresh_fingerprint() -> str:
    """A new random fingerprint for a dataset or a transform's result (``datasets`` names cache files by it).

    ``datasets`` otherwise hashes the whole table and the transform's arguments with dill, which cost a node more
    than reading its file; a random fingerprint only means that no cached transform is ever reused for it (these
    datasets live in memory and write no cache files).
    """
    from datasets.fingerprint import generate_random_fingerprint

    return str(generate_random_fingerprint())


def in_memory(frame: pd.DataFrame) -> datasets.Dataset:
    """``datasets.Dataset.from_pandas(frame, preserve_index=False)`` without hashing the table (fresh_fingerprint)."""
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable.from_pandas(df=frame, preserve_index=False), fingerprint=fresh_fingerprint())


def holdout_split(data: LabelledData, test_fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """Split off a held-out test set (stratified by label when possible), reproducibly."""
    names = {"train_new_fingerprint": fresh_fingerprint(), "test_new_fingerprint": fresh_fingerprint()}
    if "label" in data.dataset.column_names:  # one class label per example: stratify
        ds = data.dataset.cast_column("label", datasets.ClassLabel(names=data.label_names),
                                      new_fingerprint=fresh_fingerprint())
        try:
            parts = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label", **names)
        except ValueError:
            parts = ds.train_test_split(test_size=test_fraction, seed=seed, **names)
    else:  # token tags or prompt-response pairs
        parts = data.dataset.train_test_split(test_size=test_fraction, seed=seed, **names)
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
