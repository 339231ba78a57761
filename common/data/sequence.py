"""Readers for the ner and sft tasks' files: CoNLL and JSONL token files, JSONL prompt-response files.

Every problem in a file is collected and reported at once, each naming the file and its line, so an
operator fixes the data in one pass; nothing is trained before the file reads clean.

- CoNLL: one token a line, whitespace-separated columns, the token first and its BIO tag last (as in
  CoNLL-2003: ``token POS chunk tag``); a blank line ends a sentence; ``-DOCSTART-`` lines separate
  documents. Every token line must have as many columns as the file's first one.
- Token JSONL: one sentence a line, ``{"tokens": [...], "tags": [...]}`` of equal length.
- SFT JSONL: one example a line, ``{"prompt": "...", "response": "..."}`` (both non-empty strings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets

from fedtune.common.data.table import LabelledData
from fedtune.common.errors import DataError

MAX_REPORTED = 20  # problems listed one by one; the rest are counted
BIO = re.compile(r"^(O|[BI]-\S+)$")
TOKEN_SUFFIXES = (".conll", ".txt", ".tsv", ".iob", ".bio")
JSONL_SUFFIXES = (".jsonl", ".json")


def _raise(problems: list[str], code: str = "DATA_SCHEMA", skipped: list[str] | None = None) -> None:
    """Raise one DataError listing ``problems``; with ``skipped`` (a node's round) only record them there: the
    rows they name were left out, and a node's reply must not depend on one row."""
    if skipped is not None:
        skipped += problems
        return
    if problems:
        more = [f"... and {len(problems) - MAX_REPORTED} more problems"] if len(problems) > MAX_REPORTED else []
        raise DataError(problems[:MAX_REPORTED] + more, code=code)


def _text(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file", code="DATA_MISSING")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"data file {path} line {line} is not valid UTF-8 text; re-save the file as UTF-8") from err
    except OSError as err:
        raise DataError(f"data file {path}: {err.strerror or err}", code="DATA_MISSING") from err


def _json_lines(path: Path, problems: list[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(_text(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or an integer too long to convert
            problems.append(f"{path} line {lineno}: not valid JSON ({getattr(err, 'msg', str(err)[:80])})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            continue
        yield lineno, row


def read_sft_jsonl(path: Path, skipped: list[str] | None = None) -> LabelledData:
    """Prompt-response pairs: dataset columns ``prompt``, ``response``, ``line`` (``skipped``: see ``_raise``)."""
    problems: list[str] = []
    rows: dict[str, list[Any]] = {"prompt": [], "response": [], "line": []}
    for lineno, row in _json_lines(path, problems):
        bad = [f for f in ("prompt", "response") if not isinstance(row.get(f), str) or not row[f].strip()]
        if bad:
            what = " and ".join(f"'{f}'" for f in bad)
            problems.append(f"{path} line {lineno}: no {what} field (a non-empty string); "
                            f"fields are: {', '.join(list(row)[:10]) or 'none'}")
            continue
        rows["prompt"].append(row["prompt"])
        rows["response"].append(row["response"])
        rows["line"].append(lineno)
    _raise(problems, skipped=skipped)
    if not rows["line"]:
        raise DataError(f"{path}: no prompt-response examples", code="DATA_EMPTY")
    return LabelledData(datasets.Dataset.from_dict(rows), [], str(path))


def read_conll(path: Path, skipped: list[str] | None = None) -> list[tuple[int, int, list[str], list[str]]]:
    """(line, document, tokens, tags) per sentence; raises DataError listing every malformed line (with
    ``skipped``: leaves out each sentence holding one, see ``_raise``)."""
    problems: list[str] = []
    out: list[tuple[int, int, list[str], list[str]]] = []
    width: tuple[int, int] | None = None  # (columns, line that set it)
    tokens: list[str] = []
    tags: list[str] = []
    start, document, broken = 0, 0, [False]

    def close() -> None:
        if tokens and not broken[0]:
            out.append((start, document, list(tokens), list(tags)))
        tokens.clear()
        tags.clear()
        broken[0] = False

    for lineno, line in enumerate(_text(path), start=1):
        cols = line.split()
        if not cols:
            close()
            continue
        if cols[0] == "-DOCSTART-":
            close()
            document += 1
            continue
        if width is None:
            width = (len(cols), lineno)
            if len(cols) < 2:
                problems.append(f"{path} line {lineno}: 1 column; a CoNLL line needs the token first and its tag last")
        broken[0] = broken[0] or len(cols) < 2
        if len(cols) != width[0]:
            problems.append(f"{path} line {lineno}: {len(cols)} columns, expected {width[0]} (as on line {width[1]})")
            broken[0] = True
            continue
        if not tokens:
            start = lineno
        tokens.append(cols[0])
        tags.append(cols[-1])
    close()
    _raise(problems, skipped=skipped)
    return out


def read_token_jsonl(path: Path, skipped: list[str] | None = None) -> list[tuple[int, int, list[str], list[str]]]:
    """(line, document, tokens, tags) per JSONL line ``{"tokens": [...], "tags": [...]}``."""
    problems: list[str] = []
    out = []
    for lineno, row in _json_lines(path, problems):
        tokens, tags = row.get("tokens"), row.get("tags")
        if not (isinstance(tokens, list) and isinstance(tags, list) and tokens
                and all(isinstance(t, str) and t.strip() and not any(c.isspace() for c in t) for t in tokens)
                and all(isinstance(t, str) for t in tags)):
            problems.append(f"{path} line {lineno}: needs 'tokens' (non-empty list of words without spaces) and "
                            "'tags' (list of strings)")
            continue
        if len(tokens) != len(tags):
            problems.append(f"{path} line {lineno}: {len(tokens)} tokens but {len(tags)} tags")
            continue
        out.append((lineno, int(row.get("document", 0)) if isinstance(row.get("document"), int) else 0, tokens, tags))
    _raise(problems, skipped=skipped)
    return out


def tag_names(seen: Iterable[str]) -> list[str]:
    """A label list from the tags seen: ``O`` first, then each entity's B- and I- tags, sorted by entity."""
    entities = sorted({t[2:] for t in seen if t != "O"})
    return ["O"] + [f"{p}-{e}" for e in entities for p in ("B", "I")]


def token_data(sentences: Sequence[tuple[int, int, list[str], list[str]]], labels: Sequence[str],
               origin: str, skipped: list[str] | None = None) -> LabelledData:
    """Sentences as a dataset (``tokens``, ``tags`` as label indices, ``line``, ``document``).

    ``labels`` are the run's tag names (empty: every BIO tag seen, ``O`` first). A tag that is not BIO,
    or not one of ``labels``, is an error naming the file and the sentence's line (with ``skipped`` and
    ``labels``: the sentence is left out, see ``_raise``).
    """
    problems = [f"{origin} line {line}: tag {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)"
                for line, _, _, tags in sentences for tag in dict.fromkeys(tags) if not BIO.match(tag)]
    lenient = skipped is not None and bool(labels)
    _raise(problems, skipped=skipped if lenient else None)
    names = list(labels) or tag_names(t for _, _, _, tags in sentences for t in tags)
    index = {name: i for i, name in enumerate(names)}
    problems = [f"{origin} line {line}: unknown tag {tag!r}, not one of the run's labels ({', '.join(names[:20])})"
                for line, _, _, tags in sentences for tag in dict.fromkeys(tags) if tag not in index]
    _raise(problems, code="DATA_LABELS", skipped=skipped if lenient else None)
    if lenient:
        sentences = [s for s in sentences if all(t in index for t in s[3])]
    if not sentences:
        raise DataError(f"{origin}: no sentences", code="DATA_EMPTY")
    if len(names) < 2:
        raise DataError(f"{origin}: only the tag 'O' was found; NER needs at least one entity type",
                        code="DATA_LABELS")
    rows = {"tokens": [s[2] for s in sentences], "tags": [[index[t] for t in s[3]] for s in sentences],
            "line": [s[0] for s in sentences], "document": [s[1] for s in sentences]}
    return LabelledData(datasets.Dataset.from_dict(rows), names, origin)


def read_token_file(path: Path, labels: Sequence[str], skipped: list[str] | None = None) -> LabelledData:
    """A CoNLL or token-JSONL file (by suffix) as token data checked against ``labels`` (``skipped``: see
    ``_raise``)."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return token_data(read_token_jsonl(path, skipped), labels, str(path), skipped)
    if suffix in TOKEN_SUFFIXES:
        return token_data(read_conll(path, skipped), labels, str(path), skipped)
    raise DataError(f"data file {path} has suffix '{path.suffix}'; NER reads CoNLL "
                    f"({', '.join(TOKEN_SUFFIXES)}) or JSONL ({', '.join(JSONL_SUFFIXES)})")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
