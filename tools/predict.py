"""``fedtune-predict``: label texts with a trained adapter (CSV / JSONL / Parquet in, predictions out).

Example::

    fedtune-predict results/<run>/adapter reviews.csv --output predictions.csv
    fedtune-predict results/<run>/adapter --export-sentence-transformers exported/

The output keeps every input column and adds ``prediction`` (the label name) and one
``prob:<label>`` column per label. The base model is resolved from the adapter's
``fedtune.json`` (the embedded all-MiniLM-L6-v2 copy, or the Hub id at its recorded
revision); ``--base DIR`` names a local copy instead. Bad input gets a one-line
error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fedtune.common.errors import DataError, FedtuneError

OUTPUT_SUFFIXES = (".csv", ".jsonl")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="adapter directory (adapter_config.json, fedtune.json, ...)")
    p.add_argument("input", type=Path, nargs="?", help="CSV, TSV, JSONL or Parquet file with a text column")
    p.add_argument("--output", "-o", type=Path, default=None,
                   help="predictions file (.csv or .jsonl); default: CSV on standard output")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--base", default=None, metavar="DIR", help="base model directory (default: from fedtune.json)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    p.add_argument("--export-sentence-transformers", type=Path, default=None, metavar="DIR",
                   help="also write the adapter merged into its base as a stock sentence-transformers model "
                        "(encode() returns the classifier's logits; no fedtune needed to load it)")
    return p


def read_texts(path: Path, column: str) -> pd.DataFrame:
    """The input table; every row must have non-empty text in ``column``."""
    from fedtune.common.data.table import read_table

    frame = read_table(path)
    if column not in frame.columns:
        raise DataError(f"{path}: column '{column}' (--text-column) is missing; columns are: "
                        f"{', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows to predict")
    bad = [i for i, t in enumerate(frame[column]) if not isinstance(t, str) or not t.strip()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DataError(f"{path}: row {bad[0] + 2} has an empty or non-text '{column}'{more}")
    return frame


def predict_frame(frame: pd.DataFrame, column: str, adapter: Path, base: str | None,
                  batch_size: int) -> pd.DataFrame:
    from fedtune.common.tasks.classify.adapter import load_adapter

    clf = load_adapter(adapter, base)
    probs = clf.predict_proba(frame[column].tolist(), batch_size=batch_size)
    out = frame.copy()
    out["prediction"] = [clf.meta.labels[i] for i in probs.argmax(axis=1)]
    for j, label in enumerate(clf.meta.labels):
        out[f"prob:{label}"] = probs[:, j]
    return out


def write(frame: pd.DataFrame, output: Path | None) -> None:
    if output is None:
        frame.to_csv(sys.stdout, index=False)
    elif output.suffix.lower() == ".jsonl":
        frame.to_json(output, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(output, index=False)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.output is not None and args.output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise DataError(f"--output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {args.output.name}")
        if args.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.input is None and args.export_sentence_transformers is None:
            raise DataError("give an INPUT file to predict, or --export-sentence-transformers DIR")
        if args.export_sentence_transformers is not None:
            from fedtune.common.tasks.classify.adapter import export_sentence_transformer

            out = export_sentence_transformer(args.adapter, args.export_sentence_transformers, args.base)
            print(f"fedtune-predict: sentence-transformers model written to {out}", file=sys.stderr)
        if args.input is not None:
            frame = read_texts(args.input, args.text_column)
            write(predict_frame(frame, args.text_column, args.adapter, args.base, args.batch_size), args.output)
            if args.output is not None:
                print(f"fedtune-predict: {len(frame)} predictions written to {args.output}", file=sys.stderr)
    except FedtuneError as err:
        print(f"fedtune-predict: error: {'; '.join(' '.join(p.split()) for p in err.problems)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
