"""The deployed-round benchmark's cheap parts: its plain Flower app bundles, and round seconds come out right."""

from __future__ import annotations

import ast
import io
import tomllib
import zipfile

import pytest

from fedtune.sim.deploy_bench import round_seconds
from fedtune.sim.deploy_bench_app import write_app_dir


@pytest.mark.parametrize(("lines", "expected"), [
    ([{"round": 0, "elapsed-s": 0.5}, {"round": 1, "elapsed-s": 12.5}, {"round": 2, "elapsed-s": 24.75}],
     [12.0, 12.25]),
    ([{"round": 2, "elapsed-s": 30.0}, {"round": 0, "elapsed-s": 1.0}, {"round": 1, "elapsed-s": 10.0}],
     [9.0, 20.0]),  # file order does not matter, the round does
    ([{"round": 0, "elapsed-s": 3.0}], []),  # only the initial evaluation: no round yet
    ([], []),
])
def test_round_seconds_are_differences_of_elapsed_time_between_rounds(lines, expected):
    assert round_seconds(lines) == expected


def test_the_plain_app_builds_into_a_fab_that_carries_only_flower_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk  # what `flwr run APP_DIR` bundles

    app = write_app_dir(tmp_path / "app", nodes=3, rounds=4, timestamps=tmp_path / "res" / "metrics.jsonl")
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        names = set(fab.namelist())
        pyproject = tomllib.loads(fab.read("pyproject.toml").decode())
        source = fab.read("plain_app.py").decode()
    assert {"pyproject.toml", "plain_app.py"} <= names
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "plain_app:server", "clientapp": "plain_app:client"}
    assert flwr["config"] == {"num-server-rounds": 4, "nodes": 3, "timestamps": str(tmp_path / "res" / "metrics.jsonl")}
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in
                (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported <= {"__future__", "json", "shutil", "time", "pathlib", "numpy", "flwr"}  # nodes run it: no fedtune


def test_the_recorded_comparison_renders_every_app_with_its_ratio_to_plain_flower():
    from fedtune.sim.bench_report import _deployed_round

    def app(seconds: list[float]) -> dict[str, object]:
        return {"round-s": seconds, "mean-s": round(sum(seconds) / len(seconds), 2)}

    d = {"nodes": 2, "rounds": 2, "cpus": 2, "load-1min-before": 0.3, "plain": app([9.5, 10.5]),
         "fedtune": app([20.0, 22.0]), "ratio-fedtune-to-plain": 2.1}
    text = "\n".join(_deployed_round(d))
    assert "| plain Flower app | 9.50 | 10.50 | 10.00 | 1.00 |" in text
    assert "| fedtune, ClientApp process started ahead (default) | 20.00 | 22.00 | 21.00 | 2.10 |" in text
    assert "--no-prewarm`) |" not in text  # a row only for what was measured
    assert "fedtune adds 11.0 s a round to Flower's own 10.0 s" in text
