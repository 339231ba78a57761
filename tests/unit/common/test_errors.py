"""The one error formatter every CLI uses: literal, bounded, at most 20 problems."""

from __future__ import annotations

from fedtune.common.errors import MAX_PROBLEMS, clip, format_problems, quote


def test_one_problem_is_one_line() -> None:
    assert format_problems("epsilon must be > 0, got -1", prog="fedtune-x") == "fedtune-x: epsilon must be > 0, got -1"


def test_many_problems_stop_after_twenty_with_and_n_more() -> None:
    text = format_problems([f"problem {i}" for i in range(25)], prog="fedtune-x", action="must be fixed")
    lines = text.splitlines()
    assert lines[0] == "fedtune-x: 25 problems must be fixed:"
    assert len(lines) == 1 + MAX_PROBLEMS + 1 and lines[-1] == "... and 5 more"


def test_input_is_quoted_literally_and_cut() -> None:
    assert quote("[bold red]x[/]") == "'[bold red]x[/]'"
    assert quote("a\nb\x1b[31m") == "'a\\nb\\x1b[31m'"  # one line, no terminal escapes
    long = clip("y" * 1000)
    assert long.startswith("y" * 200) and long.endswith("... (800 more characters)")
