"""A run's results directory, claimed before the run and filled atomically: a finished result is never lost.

The run writes into a hidden sibling (``.NAME.partial-PID``) and the directory is renamed into place
when the run ends. An existing non-empty ``--out`` is refused unless ``--overwrite`` is given, and even
then the old results are only replaced by a run that completed; a failed or interrupted run ends up
beside them (``NAME.failed-TIME``) instead.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.errors import ConfigError


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
        if final.is_dir() and any(final.iterdir()) and not overwrite:
            raise ConfigError(f"--out {final} already holds results; choose a new directory, or pass --overwrite "
                              "to replace them once the new run has finished")
        work = final.parent / f".{final.name}.partial-{os.getpid()}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            work.mkdir()
        except OSError as err:
            raise ConfigError(f"--out {final}: cannot create it ({err.strerror or err})") from err
        return cls(final, work, overwrite)

    def finish(self, completed: bool = True) -> Path:
        """Move the run's files into place; return where they are."""
        if not self.work.exists():
            return self.final
        occupied = self.final.is_dir() and any(self.final.iterdir())
        if occupied and not completed:
            target = self.final.with_name(f"{self.final.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.work, target)
            return target
        if occupied:
            aside = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, aside)
            os.replace(self.work, self.final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if self.final.is_dir():
                self.final.rmdir()
            os.replace(self.work, self.final)
        return self.final
