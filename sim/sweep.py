"""``fedtune-sweep``: the privacy-utility grid in one command, resumable, with a table and a plot.

    fedtune-sweep --epsilon 1,2,4,8,inf --repeats 3 [--central] [--jobs N] --out sweeps/rt [fedtune-sim options]

Every point of the grid is a real ``fedtune-sim`` run (a subprocess) with its own results directory
``OUT/points/<mode>-eps<epsilon>-seed<seed>/`` and log ``OUT/logs/<point>.log``:

- federated (default) at each epsilon; ``inf`` is the non-private baseline (``--baseline``: ``off``, the
  tuned non-private optimiser, or ``clip-only``, the DP pipeline without noise);
- central (``--central`` adds it; ``--modes central`` runs it alone) at each epsilon: one node holding the
  union of the clients' training data, with its own budget;
- the central non-private baseline (the reference line of the plot), unless ``--no-reference``.

Repeat ``r`` runs with ``--seed SEED+r`` (split, initial adapter, client sampling), and the nodes' noise
is their own secret randomness, so repeats differ. A point is finished once its results directory holds
a ``summary.json`` (written at the end of a run, whichever way it ended); a re-run of the same command skips
finished points and runs the rest (a run that ends without a summary, e.g. because Ray could not start, is
tried ``--retries`` more times). The grid's fedtune-sim options are recorded in ``OUT/sweep.json``: a
sweep directory never mixes points run with different options. Results: ``sweep.csv`` (one row per run),
``sweep.md`` (mean +- std over seeds, the command line, the majority class and the gap to central
non-private), ``sweep.png`` (accuracy against epsilon).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.common import exit_codes
from fedtune.common.errors import ConfigError, FedtuneError, format_problems

console = Console(stderr=True)
MODES = ("federated", "central")
OPTIONS_FILE = "sweep.json"
SUMMARY = "summary.json"
# fedtune-sim options the sweep sets itself for each point.
OWNED = ("--out", "--overwrite", "--epsilon", "--no-dp", "--dp-mode", "--seed", "--central")


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    mode: str  # federated | central
    epsilon: float  # math.inf: the non-private baseline
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-eps{eps_label(self.epsilon)}-seed{self.seed}"

    def sim_args(self, baseline: str) -> list[str]:
        privacy = ["--dp-mode", baseline] if math.isinf(self.epsilon) else ["--dp-mode", "dp", "--epsilon",
                                                                             f"{self.epsilon:g}"]
        return [*privacy, "--seed", str(self.seed), *(["--central"] if self.mode == "central" else [])]


def eps_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def parse_epsilons(text: str) -> list[float]:
    """``1,2,4,8,inf`` -> [1.0, 2.0, 4.0, 8.0, inf]; every bad value is named."""
    out, bad = [], []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            bad.append(part)
            continue
        if not (value > 0) or math.isnan(value):
            bad.append(part)
        elif value not in out:
            out.append(value)
    if bad or not out:
        raise ConfigError(f"--epsilon must be a comma-separated list of numbers > 0 or inf, got {text!r}")
    return sorted(out)


def grid(epsilons: Sequence[float], repeats: int, seed: int, modes: Sequence[str], *,
         reference: bool = True) -> list[Point]:
    """The sweep's points: each mode at each epsilon and seed, then (``reference``) the central non-private one."""
    seeds = [seed + r for r in range(repeats)]
    points = [Point(m, e, s) for m in modes for e in epsilons for s in seeds]
    points += [Point("central", math.inf, s) for s in seeds] if reference else []
    return list(dict.fromkeys(points))  # the reference may already be in the central grid


def finished(point_dir: Path) -> dict[str, Any] | None:
    """The point's summary, if its run ended (completed or stopped early); None while it still has to run."""
    try:
        summary = json.loads((point_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "status" in summary else None


@dataclass(frozen=True)
class Sweep:
    out: Path
    points: list[Point]
    sim_options: list[str]  # passed to every fedtune-sim run
    baseline: str  # the non-private mode of the epsilon=inf points
    jobs: int
    retries: int = 0  # extra tries of a point whose run ended without a summary (e.g. Ray failed to start)

    def point_dir(self, point: Point) -> Path:
        return self.out / "points" / point.name

    def command(self, point: Point) -> list[str]:
        return [sys.executable, "-m", "fedtune.sim.cli", *self.sim_options, *point.sim_args(self.baseline),
                "--out", str(self.point_dir(point)), "--overwrite"]

    def run_point(self, point: Point) -> int:
        """Run one point as a fedtune-sim subprocess (its output in OUT/logs/<point>.log), tried again up to
        ``retries`` times while a run ends without a summary; the last exit code."""
        log = self.out / "logs" / f"{point.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            for attempt in range(self.retries + 1):
                fh.write(f"$ {shlex.join(self.command(point))}  # try {attempt + 1}\n")
                fh.flush()
                code = subprocess.run(self.command(point), stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
                if finished(self.point_dir(point)) is not None:
                    break
        return code


def _check_options(out: Path, sim_options: list[str], baseline: str, command: str, *, record: bool = True) -> None:
    """A sweep directory holds points of one set of fedtune-sim options (and one baseline mode); ``record`` writes
    this command into ``sweep.json``."""
    recorded: dict[str, Any] = {"fedtune-sim-options": sim_options, "baseline": baseline}
    path = out / OPTIONS_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); move it aside or choose a new --out") from err
        if {k: before.get(k) for k in recorded} != recorded:
            earlier = shlex.join(before.get("fedtune-sim-options") or [])
            raise ConfigError(f"{out} holds a sweep run with other options ({earlier} --baseline "
                              f"{before.get('baseline')}); choose a new --out, or give the same fedtune-sim options")
    if record:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded | {"command": command}, indent=2) + "\n")


def run(sweep: Sweep) -> dict[str, int]:
    """Run every unfinished point (``jobs`` at a time) under a progress bar; point name -> exit code."""
    todo = [p for p in sweep.points if finished(sweep.point_dir(p)) is None]
    codes: dict[str, int] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"sweep ({len(sweep.points) - len(todo)} finished before)",
                                 total=len(sweep.points), completed=len(sweep.points) - len(todo))

        def one(point: Point) -> None:
            progress.update(task, description=f"running {point.name}")
            codes[point.name] = sweep.run_point(point)
            progress.advance(task)
            progress.update(task, description=f"{point.name}: exit {codes[point.name]}")

        with ThreadPoolExecutor(max_workers=max(1, sweep.jobs)) as pool:
            list(pool.map(one, todo))
    return codes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other option is passed to every fedtune-sim run (see fedtune-sim --help).")
    p.add_argument("--epsilon", default="1,2,4,8,inf", help="comma-separated epsilons; inf = non-private")
    p.add_argument("--repeats", type=int, default=3, help="seeds per point (default 3)")
    p.add_argument("--seed", type=int, default=42, help="first seed; repeat r uses SEED+r (default 42)")
    p.add_argument("--central", action="store_true", help="also run the central grid (central DP at each epsilon)")
    p.add_argument("--modes", default=None, help="comma-separated: federated, central (default federated; "
                                                 "--central adds central)")
    p.add_argument("--baseline", choices=("off", "clip-only"), default="off",
                   help="what epsilon=inf runs: off (tuned non-private optimiser, default) or clip-only")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out the central non-private reference (say, one lever of a study whose reference "
                        "another sweep on the same data ran); the table then states no gap")
    p.add_argument("--jobs", type=int, default=1, help="points run in parallel (default 1: sequential)")
    p.add_argument("--retries", type=int, default=1,
                   help="run a point again this many times when its run ends without a summary, e.g. when Ray "
                        "could not start on a loaded machine (default 1)")
    p.add_argument("--out", type=Path, default=Path("sweeps/latest"), help="sweep directory (default sweeps/latest)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite sweep.csv/.md/.png from this grid's finished points (same fedtune-sim options)")
    return p


def _modes(args: argparse.Namespace) -> list[str]:
    modes = [m.strip() for m in (args.modes or "federated").split(",") if m.strip()]
    if args.central and "central" not in modes:
        modes.append("central")
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes must name federated and/or central, got {args.modes!r}")
    return modes


def build(argv: Sequence[str] | None) -> tuple[Sweep, argparse.Namespace]:
    """Parse the command line into a Sweep; ConfigError names every problem."""
    args, sim_options = parser().parse_known_args(argv)
    problems = [f"{opt} is set by fedtune-sweep for each point; leave it out" for opt in OWNED
                if any(o == opt or o.startswith(opt + "=") for o in sim_options)]
    if args.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {args.repeats}")
    if args.jobs < 1:
        problems.append(f"--jobs must be >= 1, got {args.jobs}")
    if args.retries < 0:
        problems.append(f"--retries must be >= 0, got {args.retries}")
    try:
        points = grid(parse_epsilons(args.epsilon), args.repeats, args.seed, _modes(args),
                      reference=not args.no_reference)
    except ConfigError as err:
        problems += err.problems
        points = []
    if problems:
        raise ConfigError(problems)
    return Sweep(args.out.absolute(), points, sim_options, args.baseline, args.jobs, args.retries), args


def _check_sim_options(sweep: Sweep) -> list[str]:
    """Let fedtune-sim validate the shared options (exit 2 on a mistake) before any point starts; return a warning
    for each option that has no effect in any point of the grid (one that matters to some points only is the
    grid's design: a learning rate for DP under an epsilon=inf point)."""
    from fedtune.sim.applicability import Mode, inert_settings
    from fedtune.sim.cli import given_settings, settings_from_args
    from fedtune.sim.cli import parser as sim_parser

    inert: dict[str, str] | None = None
    for point in sweep.points:
        try:
            sim_args = sim_parser().parse_args([*sweep.sim_options, *point.sim_args(sweep.baseline)])
        except SystemExit as err:
            raise ConfigError(f"fedtune-sim does not accept the options {shlex.join(sweep.sim_options)}") from err
        given = given_settings(sim_args)
        here = inert_settings(Mode(settings_from_args(sim_args), sim_args.central, sim_args.clients), given)
        inert = here if inert is None else {k: v for k, v in inert.items() if k in here}
    return list((inert or {}).values())


def main(argv: Sequence[str] | None = None) -> int:
    from fedtune.sim.sweep_report import write_outputs

    raw = list(sys.argv[1:] if argv is None else argv)
    command = "fedtune-sweep " + shlex.join(a for a in raw if a != "--report-only")  # the command that runs the grid
    try:
        sweep, args = build(raw)
        for warning in [] if args.report_only else _check_sim_options(sweep):
            console.print(f"warning: {warning} (in every point of this sweep)", markup=False, highlight=False)
        _check_options(sweep.out, sweep.sim_options, sweep.baseline, command, record=not args.report_only)
    except FedtuneError as err:
        console.print(format_problems(err.problems, prog="fedtune-sweep"), markup=False, highlight=False)
        return exit_codes.BAD_INPUT
    try:
        codes = {} if args.report_only else run(sweep)
    except KeyboardInterrupt:
        console.print("interrupted: finished points are kept; run the same command again to go on")
        return exit_codes.INTERRUPTED
    paths = write_outputs(sweep, command)
    console.print(f"sweep: {len(sweep.points)} points, {len(codes)} run now; {', '.join(str(p) for p in paths)}",
                  markup=False, highlight=False)
    missing = [p.name for p in sweep.points if finished(sweep.point_dir(p)) is None]
    if missing:
        console.print(f"{len(missing)} point(s) did not finish (see {sweep.out / 'logs'}): {', '.join(missing)}",
                      markup=False, highlight=False)
        return exit_codes.FAILED
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
