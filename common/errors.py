"""The project's exceptions: operator mistakes that CLIs turn into one clear message."""

from __future__ import annotations

from collections.abc import Iterable


class FedtuneError(Exception):
    """Base of every error an operator can fix (bad config, bad data, missing files).

    CLI entry points catch this, print the message and exit non-zero; anything else
    is a bug and keeps its traceback.
    """

    default_code = "INTERNAL"  # the code a node sends the server instead of this error's text

    def __init__(self, problems: str | Iterable[str], *, code: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.code = code or self.default_code
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1 else self.problems[0])


class ConfigError(FedtuneError):
    """A setting is missing, malformed or out of range."""

    default_code = "POLICY"


class DataError(FedtuneError):
    """A data file is missing, unreadable or does not match the expected schema."""

    default_code = "DATA_SCHEMA"


class ModelError(FedtuneError):
    """A base model or adapter cannot be loaded."""

    default_code = "MODEL"


class PrivacyError(FedtuneError):
    """A privacy budget or accountant state is invalid or would be exceeded."""

    default_code = "LEDGER"


class RunError(FedtuneError):
    """A federated run failed or could not be started."""

    default_code = "INTERNAL"


# -- printing problems for people: literal text, bounded size (used by every CLI) --

MAX_QUOTE = 200  # characters of operator input quoted in a message
MAX_LINE = 400  # characters of one printed problem
MAX_PROBLEMS = 20  # problems printed before "and N more"


def _printable(text: str) -> str:
    """Control characters (newlines, escapes, NUL) shown escaped, so one problem stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def clip(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` made printable and cut to ``limit`` characters, saying how much was left out."""
    text = _printable(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """Operator input for a message: single-quoted, printable, at most ``limit`` characters."""
    return f"'{clip(str(value), limit)}'"


def format_problems(problems: str | Iterable[str], *, prog: str = "", action: str = "",
                    limit: int = MAX_PROBLEMS) -> str:
    """What a CLI prints: one bounded, literal line per problem, the first ``limit`` only.

    ``format_problems(["a", "b"], prog="fedtune-x", action="must be fixed")`` gives
    ``fedtune-x: 2 problems must be fixed:`` and a ``- `` line for each; a single
    problem without ``action`` is one line: ``fedtune-x: a``.
    """
    items = [problems] if isinstance(problems, str) else list(problems)
    lead = f"{prog}: " if prog else ""
    if len(items) == 1 and not action:
        return lead + clip(items[0], MAX_LINE)
    shown = [f"- {clip(p, MAX_LINE)}" for p in items[:limit]]
    if len(items) > limit:
        shown.append(f"... and {len(items) - limit} more")
    noun = "problem" if len(items) == 1 else "problems"
    return "\n".join([f"{lead}{len(items)} {noun}{' ' + action if action else ''}:", *shown])


def problems_of(err: BaseException) -> list[str]:
    """The problems an exception carries (a FedtuneError's list, or its text)."""
    return list(err.problems) if isinstance(err, FedtuneError) else [str(err) or type(err).__name__]
