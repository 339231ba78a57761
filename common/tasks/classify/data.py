"""Labelled text rows for classification: a text column and a label column, checked row by row.

Every problem found in a file is reported at once, naming the file, column and row, so an operator can fix the
data in one pass; a node's round instead leaves such rows out (``skipped``) and logs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedtune.common.data.corpus import BUILTIN
from fedtune.common.data.table import LabelledData, in_memory, read_table
from fedtune.common.errors import DataError
from fedtune.common.settings import DataSettings


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
    return LabelledData(dataset=in_memory(out), label_names=names)


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
