"""The README's quick start, run on the CSV shipped in tests/data: every command as written.

Every federation costs about half a minute of Flower and Ray start-up on 2 cores, whatever its size, so the
default suite runs the two baselines (one federation) at a test's size (the tiny model, options appended that
only change the job's size); slow tests run all four commands, cut to one epsilon in the sweep, and verbatim
through the installed console scripts on the classify job's all-mpnet-base-v2.
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

import psutil
import pytest
import torch
from peft import PeftModel

from fedtune.common.models.base import load_base
from fedtune.common.runtime import OWNER
from fedtune.common.tasks.classify.model import build_classifier
from fedtune.sim.cli import main as sim_main
from fedtune.sim.sweep import main as sweep_main
from tests.integration.test_first_hour import LONG_FLOAT, THIRD_PARTY_BARS

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
    assert all(c[c.index("--dataset") + 1] == str(DATA.relative_to(ROOT)) for c in commands)
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


def _copy_data(root: Path) -> None:
    """The example CSV where a clone has it (the quick start runs from the repository's root)."""
    (root / DATA.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA, root / DATA.relative_to(ROOT))


def _flower_processes(tmp_path: Path) -> set[int]:
    """Flower and Ray processes, other than those another run on this machine tagged as its own."""
    names = ("flower-superlink", "flwr-simulation", "flower-superexec", "raylet", "gcs_server")
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(n in " ".join(proc.info["cmdline"] or []) for n in names):
            try:
                owner = proc.environ().get(OWNER.name, "")
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                owner = ""
            if not owner or str(tmp_path) in owner:
                found.add(proc.info["pid"])
    return found


def test_the_quick_start_baselines_run_as_written_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The non-private federated run (through Flower's simulation engine: it learns, its adapter loads with PEFT,
    nothing is left running, the terminal is fedtune's own) and the central baseline, at a test's size. The DP run
    and the sweep take three more federations: the slow test runs them."""
    monkeypatch.chdir(tmp_path)
    _copy_data(tmp_path)
    before = _flower_processes(tmp_path)
    size = ["--model", str(tiny_model_dir), "--set", "max-seq-len=16", "--set", "batch-size=32", "--rounds", "2"]
    no_dp, central = quick_start()[1:3]
    assert sim_main([*no_dp[1:], *size, "--clients", "3", "--local-epochs", "6"]) == 0
    assert sim_main([*central[1:], *size]) == 0
    captured = capsys.readouterr()
    terminal = " ".join((captured.out + captured.err).split())
    assert not [bar for bar in THIRD_PARTY_BARS if bar in terminal] and not LONG_FLOAT.findall(terminal), terminal
    assert "has no effect" not in terminal, terminal  # the quick start gives no setting without effect
    assert _flower_processes(tmp_path) <= before, "the simulation left Flower/Ray processes running"
    out = tmp_path / "runs" / "no-dp"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2] and [len(r["clients"]) for r in rounds[1:]] == [3, 3]
    assert max(r["accuracy"] for r in rounds[1:]) > rounds[0]["accuracy"] + 0.1
    assert all(c["status"] == "trained" and c["epsilon"] == float("inf") for r in rounds[1:] for c in r["clients"])
    assert json.loads((out / "config.json").read_text())["num-clients"] == 3 and (out / "metrics.png").stat().st_size
    for name in ("no-dp", "central"):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 2, summary
        model = PeftModel.from_pretrained(build_classifier(load_base(str(tiny_model_dir)), 2),
                                          str(tmp_path / "runs" / name / "adapter"))
        assert sum("lora_" in n for n, _ in model.named_parameters()) > 0
        assert torch.isfinite(next(p for n, p in model.named_parameters() if "lora_B" in n)).all()


@pytest.mark.slow
def test_the_quick_start_runs_as_written_at_a_smaller_size(tiny_model_dir, tmp_path, monkeypatch):
    """All four commands, the sweep cut to one epsilon: about 2 minutes on 2 cores."""
    monkeypatch.chdir(tmp_path)
    _copy_data(tmp_path)
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
    """The lines exactly as a researcher pastes them (console scripts, the classify job's all-mpnet-base-v2)."""
    _copy_data(tmp_path)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in quick_start():
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    _check_results(tmp_path / "runs", budget=8.0)
