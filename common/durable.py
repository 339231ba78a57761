"""Crash-safe file writes shared by ledgers, checkpoints, keys and results."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: str | bytes, *, sync_dir: bool = True) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``, fsync the directory: all or nothing.

    ``sync_dir=False`` leaves the rename's durability to the file system: after a crash ``path`` holds either the
    new content or its previous, complete content (for a file whose previous content may come back).
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)
