"""Daemon logs: one line per event, human-readable or JSON (``--log-format json`` for journald/ELK).

Log lines name events and our own values (paths, round numbers, codes). They
never carry keys, data rows or raw exception text received from another party:
callers log a code or a clipped, printable summary instead (see
:func:`fedtune.common.errors.clip`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Literal

from fedtune.common.errors import clip

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, component, message."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "component": self.component, "logger": record.name,
            "message": clip(record.getMessage(), 2000),
        }
        if isinstance(event := getattr(record, "event", None), str):
            entry["event"] = event
        return json.dumps(entry, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``TIME COMPONENT LEVEL message`` with the message kept on one line."""

    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s {component} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def setup(component: str, fmt: LogFormat = "text", log_file: Path | None = None) -> None:
    """Log INFO and above to stderr (and ``log_file``), one line per event, in ``fmt``."""
    formatter: logging.Formatter = JsonFormatter(component) if fmt == "json" else TextFormatter(component)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
