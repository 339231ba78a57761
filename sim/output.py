"""A run's results directory, claimed before the run and filled atomically: a finished result is never lost.

The run writes into a hidden sibling (``.NAME.partial-PID``) and the directory is renamed into place
when the run ends. An existing non-empty ``--out`` is refused unless ``--overwrite`` is given, and even
then the old results are only replaced by a run that completed; a failed or interrupted run ends up
beside them (``NAME.failed-TIME``) instead.

A run that never started (bad input found by the checks before training: a missing column, a partitioner
that does not fit the data) holds no results: its files are removed, so the corrected command can use the
same ``--out``. A directory left by such a run (only the files written before training, no round, no
summary, no ledger entry) is not taken for results either.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import ConfigError

# What fedtune-sim writes before the first round: the resolved settings, the nodes' data and keys, the app.
BEFORE_TRAINING = frozenset({"config.json", "clients", "flower"})
# Files that exist only once a run has trained or evaluated something (a node's ledger entry included).
RESULT_FILES = ("metrics.jsonl", "summary.json", "ledger.jsonl")


def holds_results(path: Path) -> bool:
    """Whether ``path`` holds anything but the files of a run that never started (or is not a directory)."""
    if not path.is_dir():
        return path.exists()
    entries = {p.name for p in path.iterdir()}
    if entries - BEFORE_TRAINING or ("config.json" in entries and not _our_config(path / "config.json")):
        return True
    return any(next(path.rglob(name), None) is not None for name in RESULT_FILES)


def _our_config(path: Path) -> bool:
    """A config.json that fedtune-sim wrote (it names the number of clients), not someone else's file."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "num-clients" in config


@dataclass(frozen=True)
class ResultsDir:
    final: Path  # where the results end up
    work: Path  # where the run writes meanwhile
    overwrite: bool

    @classmethod
    def claim(cls, out: Path | None, *, overwrite: bool) -> ResultsDir:
        final = (out or Path("results") / time.strftime("%Y%m%d-%H%M%S")).absolute()
        if final.exists() and not final.is_dir():
            raise ConfigError(f"--out {final} exists and is not a directory; choose a directory path")
        if holds_results(final) and not overwrite:
            raise ConfigError(f"--out {final} already holds results; choose a new directory, or pass --overwrite "
                              "to replace them once the new run has finished")
        work = final.parent / f".{final.name}.partial-{os.getpid()}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            work.mkdir()
        except OSError as err:
            raise ConfigError(f"--out {final}: cannot create it ({err.strerror or err})") from err
        return cls(final, work, overwrite)

    @property
    def started(self) -> bool:
        """Whether the run got as far as a round (a ledger entry, a metrics line or a summary)."""
        return self.work.is_dir() and holds_results(self.work)

    def discard(self) -> None:
        """Remove the files of a run that never started (a leftover of one in ``final`` too)."""
        shutil.rmtree(self.work, ignore_errors=True)
        if self.final.is_dir() and not holds_results(self.final):
            shutil.rmtree(self.final, ignore_errors=True)

    def finish(self, completed: bool = True) -> Path:
        """Move the run's files into place; return where they are."""
        if not self.work.exists():
            return self.final
        occupied = holds_results(self.final)
        if occupied and not completed:
            target = self.final.with_name(f"{self.final.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.work, target)
            return target
        if self.final.is_dir():  # earlier results (--overwrite) or the leftover of a run that never started
            aside = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, aside)
            os.replace(self.work, self.final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.work, self.final)
        return self.final
