"""Shared fixtures: a tiny BERT and an easy labelled CSV, built locally (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.tiny import make_sentiment_frame, make_tiny_model  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip fails the test unless it is marked ``slow``: the default suite must run everything it collects,
    so that CI cannot go green with a suite left out (a missing tool, say). Optional tools of slow tests
    (prometheus, chromium) may skip."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("slow") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} was skipped ({reason}), but only tests marked slow may skip: install "
                           "what it needs (make test-tools) or mark it slow")
    return report


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    make_sentiment_frame(600).to_csv(path, index=False)
    return path


@pytest.fixture()
def flower_task_identity() -> Iterator[None]:
    """The run/node/task identity Flower's runtime sets before a ClientApp runs (for in-process calls)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
