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
