"""fedtune-sim's exit code: a run in which no client ever trained is a failure, not "completed"."""

from __future__ import annotations

import io

from rich.console import Console

from fedtune.common import exit_codes
from fedtune.sim import cli
from fedtune.sim.cli import _verdict

SUMMARY = {"status": "completed", "final-accuracy": 0.5, "epsilon-max": None}


def _round(n: int, *statuses: tuple[str, str]) -> dict:
    return {"round": n, "clients": [{"status": s, "code": c} for s, c in statuses]}


def test_no_client_trained_in_any_round_fails_with_the_reply_codes(monkeypatch):
    printed = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=printed, width=200))
    rounds = [{"round": 0}, _round(1, ("error", "POLICY"), ("refused", "POLICY_MIN_NOISE")),
              _round(2, ("error", "POLICY"))]
    assert _verdict(SUMMARY, "accuracy", rounds) == exit_codes.FAILED
    out = printed.getvalue()
    assert "no update was aggregated" in out and "POLICY, POLICY_MIN_NOISE" in out


def test_one_trained_reply_is_enough_and_a_run_without_client_rows_is_judged_by_its_summary():
    rounds = [{"round": 0}, _round(1, ("error", "POLICY"), ("trained", ""))]
    assert _verdict(SUMMARY, "accuracy", rounds) == exit_codes.OK
    assert _verdict(SUMMARY, "accuracy", [{"round": 0}, {"round": 1}]) == exit_codes.OK  # central runs


def test_secure_rounds_whose_sum_was_never_aggregated_fail():
    """The nodes trained, but SecAgg+ never completed: the adapter is the initial one."""
    failed = _round(1, ("trained", ""), ("trained", "")) | {"secure-aggregation": {"aggregated": False}}
    assert _verdict(SUMMARY, "accuracy", [{"round": 0}, failed]) == exit_codes.FAILED
    done = _round(2, ("trained", "")) | {"secure-aggregation": {"aggregated": True}}
    assert _verdict(SUMMARY, "accuracy", [{"round": 0}, failed, done]) == exit_codes.OK
