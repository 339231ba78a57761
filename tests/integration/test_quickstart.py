"""The README's quick start, run on the CSV shipped in tests/data: every command as written.

The default suite runs each command with options appended that only make the job smaller (the tiny model,
one round, two clients, one epsilon in the sweep): the same code paths in about a minute. The slow test runs the
lines verbatim, through the installed console scripts, on the embedded MiniLM.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.sim.cli import main as sim_main
from fedtune.sim.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "reviews.csv"
MARKER = "<!-- quick-start:"


def quick_start() -> list[list[str]]:
    """Every ``fedtune-*`` command of the README's quick-start block, as argument lists."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    assert block is not None, "the README's quick start has no bash block after its marker"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("fedtune-")]


def test_the_quick_start_is_a_dp_run_both_baselines_and_a_sweep_on_one_csv():
    commands = quick_start()
    assert [c[0] for c in commands] == ["fedtune-sim"] * 3 + ["fedtune-sweep"]
    assert all(c[c.index("--dataset") + 1] == DATA.name for c in commands)
    assert ["--no-dp" in c for c in commands] == [False, True, True, False]
    assert ["--central" in c for c in commands] == [False, False, True, False]


def _check_results(runs: Path, *, budget: float) -> None:
    summaries = {name: json.loads((runs / name / "summary.json").read_text()) for name in ("dp", "no-dp", "central")}
    assert all(s["status"] == "completed" for s in summaries.values()), summaries
    assert 0 < summaries["dp"]["epsilon-max"] <= budget
    assert math.isinf(summaries["no-dp"]["epsilon-max"]) and summaries["central"]["mode"] == "central"
    assert (runs / "sweep" / "sweep.md").is_file() and (runs / "sweep" / "sweep.png").is_file()
    points = sorted(p.name for p in (runs / "sweep" / "points").iterdir())
    assert all((runs / "sweep" / "points" / p / "summary.json").is_file() for p in points), points


def test_the_quick_start_runs_as_written_at_a_smaller_size(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(DATA, tmp_path / DATA.name)
    smaller = ["--model", str(tiny_model_dir), "--set", "max-seq-len=16", "--set", "batch-size=32", "--rounds", "1",
               "--max-train-examples", "120"]
    for command in quick_start():
        if command[0] == "fedtune-sweep":
            assert sweep_main([*command[1:], *smaller, "--epsilon", "8"]) == 0, command  # one point of the grid
        else:
            assert sim_main([*command[1:], *smaller, *([] if "--central" in command else ["--clients", "2"])]) == 0, \
                command
    _check_results(tmp_path / "runs", budget=8.0)


@pytest.mark.slow
def test_the_quick_start_runs_verbatim(tmp_path):
    """The lines exactly as a researcher pastes them (console scripts, embedded MiniLM): about 10 min on 2 cores."""
    shutil.copy(DATA, tmp_path / DATA.name)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in quick_start():
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    _check_results(tmp_path / "runs", budget=8.0)
