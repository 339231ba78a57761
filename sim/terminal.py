"""What fedtune-sim's terminal shows: our own progress, table and verdict, nothing from the libraries below.

transformers, datasets and huggingface_hub draw progress bars ("Loading weights", "Casting the dataset",
"Flattening the indices") and log through their own stderr handlers; numpy and Opacus raise Python
warnings. Inside :func:`library_output` the bars are off, and every library log record and Python warning
goes to the run's log file instead; ``--verbose`` turns the bars back on and shows the log on the terminal
too. Everything is restored on exit (the CLI may run more than once in one process, e.g. under tests).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

# Loggers that carry their own handlers or print to stderr; "py.warnings" is where logging puts Python warnings.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "flwr", "opacus", "torch", "ray", "py.warnings")


def number(value: object, digits: int = 4) -> str:
    """A float at the precision of the results table (``0.7544``, ``inf``); anything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@contextmanager
def library_output(log_file: Path, *, verbose: bool) -> Iterator[None]:
    """Route the libraries' logs and warnings to ``log_file`` (and stderr when ``verbose``); their progress
    bars are off unless ``verbose``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [handler]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    with ExitStack() as stack:
        stack.callback(handler.close)
        if not verbose:
            stack.enter_context(_progress_bars_off())
        for name in ("", *LIBRARY_LOGGERS):
            stack.enter_context(_logger_to(logging.getLogger(name), handlers,
                                           logging.INFO if verbose or not name else logging.WARNING))
        logging.captureWarnings(True)
        stack.callback(logging.captureWarnings, False)
        yield


@contextmanager
def _logger_to(logger: logging.Logger, handlers: list[logging.Handler], level: int) -> Iterator[None]:
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers = [*handlers] if not logger.name or logger.name == "root" else []
    logger.propagate = True  # a library record reaches the root logger's handlers, once
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


@contextmanager
def _progress_bars_off() -> Iterator[None]:
    """transformers', datasets' and huggingface_hub's tqdm bars off; each put back as it was."""
    import datasets.utils.logging as datasets_logging
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    switches: list[tuple[bool, Callable[[], None], Callable[[], None]]] = [
        (transformers_logging.is_progress_bar_enabled(), transformers_logging.enable_progress_bar,
         transformers_logging.disable_progress_bar),
        (datasets_logging.is_progress_bar_enabled(), datasets_logging.enable_progress_bar,
         datasets_logging.disable_progress_bar),
        (not hub.are_progress_bars_disabled(), hub.enable_progress_bars, _hub_bars_off),
    ]
    for _, _, off in switches:
        off()
    try:
        yield
    finally:
        for was_on, on, _ in switches:
            if was_on:
                on()


def _hub_bars_off() -> None:
    import huggingface_hub.utils as hub

    hub.disable_progress_bars()  # a call disables them until enable_progress_bars() (it is also a context manager)
